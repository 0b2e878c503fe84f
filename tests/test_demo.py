"""The demo provider answers readably about the question: Markdown with a list and a code block, thinking first,
at the pipeline's speed; and `words` still gives exact, long replies for tests and load."""
import re

import pytest

from services.operations.pipelines import Pipeline, PipelineConfigError, default_pipelines, load_pipelines
from services.providers import GenerationRequest, Turn
from services.providers.demo import DemoProvider, topic_of


async def run(options, prompt):
    provider = DemoProvider(Pipeline(id="d", provider="demo", options={**options, "rate": 0}))
    text, thinking, order = "", "", []
    async for chunk in provider.stream(request(prompt)):
        if chunk.thinking:
            thinking += chunk.thinking
            order.append("thinking")
        if chunk.text:
            text += chunk.text
            order.append("text")
    return text, thinking, order


def request(prompt):
    return GenerationRequest(pipeline=None, session_id="s", session_type="person", message_id="m",
                             prompt=Turn("user", prompt, "u"))


def test_the_topic_is_the_question_without_its_small_words():
    assert topic_of("What is a resumable stream?") == "resumable stream"
    assert topic_of("?") == "this"


@pytest.mark.gen_test(timeout=10)
async def test_the_default_pipeline_answers_about_the_question_in_markdown_and_thinks_first():
    (default,) = list(default_pipelines())
    text, thinking, order = await run(default.options, "How do Python generators work?")
    assert text.startswith('You said "How do Python generators work?".')
    assert text.count("Python generators") >= 3                 # it is about the question
    assert re.search(r"^- \*\*\w", text, re.M)                  # a Markdown list
    assert re.search(r"^```python\n.*\n```$", text, re.M | re.S)  # a closed code block
    assert "Python generators" in thinking and order.index("text") > order.index("thinking")
    assert order[:order.index("text")] == ["thinking"] * order.index("text")  # all thinking comes first
    assert default.options["rate"] > 0                          # readable speed, not a burst


@pytest.mark.gen_test(timeout=10)
async def test_words_gives_exactly_that_many_words_after_the_quote():
    text, thinking, _ = await run({"words": 500, "thinking": 7}, "keep going")
    assert len(text.split()) == 4 + 500 and len(thinking.split()) == 7


def test_rate_sets_the_speed():
    assert DemoProvider(Pipeline(id="d", options={"rate": 5})).delay == 1 / 5
    assert DemoProvider(Pipeline(id="d", options={"rate": 5, "chunk_words": 3})).delay == 3 / 5
    assert DemoProvider(Pipeline(id="d", options={"rate": 0})).delay == 0


def test_thinking_and_rate_are_checked_in_a_pipelines_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[pipelines.d]\nprovider = "demo"\noptions = { rate = 12.5, thinking = true }\n')
    (p,) = list(load_pipelines(path))
    assert p.options == {"rate": 12.5, "thinking": True}
    path.write_text('[pipelines.d]\nprovider = "demo"\noptions = { thinking = "lots" }\n')
    with pytest.raises(PipelineConfigError, match="options.thinking.*true, false, or a word count"):
        load_pipelines(path)
