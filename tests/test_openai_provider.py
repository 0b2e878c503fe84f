"""The OpenAI-compatible provider against a real HTTP server on loopback (tests/upstream.py): no mocks of openai."""
import asyncio
import contextlib
import logging
import re
import time

import pytest

from services.operations.pipelines import Pipeline, Timeouts
from services.providers import GenerationRequest, ProviderError, Turn, make_provider
from services.providers.openai_compat import OpenAIProvider, ThinkSplitter, _sse_data, build_messages
from tests.upstream import Script, closed_port

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def provider_for(io_loop, upstream):
    """provider_for(model, **pipeline_fields) -> an OpenAIProvider pointed at the fake upstream."""
    made = []

    def make(model="m", **fields):
        fields.setdefault("base_url", upstream.base_url)
        fields.setdefault("retry_backoff", 0.01)
        fields.setdefault("timeouts", Timeouts(connect=2.0))
        provider = make_provider(Pipeline(id="p1", provider="openai", model=model, **fields))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        io_loop.run_sync(provider.aclose)


def request(provider, prompt="What now?", *, history=(), session_type="person", sender="alice"):
    return GenerationRequest(pipeline=provider.pipeline, session_id="s-42", session_type=session_type,
                             message_id="msg-7", history=list(history), prompt=Turn("user", prompt, sender))


async def collect(provider, req):
    chunks = []
    async with contextlib.aclosing(provider.stream(req)) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


async def failure(provider, req):
    """Run a stream to its error; -> (ProviderError, chunks received before it)."""
    chunks = []
    with pytest.raises(ProviderError) as info:
        async with contextlib.aclosing(provider.stream(req)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
    return info.value, chunks


def test_make_provider_knows_openai():
    provider = make_provider(Pipeline(id="x", provider="openai", model="m", base_url="http://127.0.0.1:1/v1"))
    assert isinstance(provider, OpenAIProvider)


# --- streaming -----------------------------------------------------------------------------------------------

async def assert_cancel_disconnects_upstream(task, upstream):
    """Cancel a consumer the way a stop does; the fake upstream must see its client leave within 100 ms."""
    stopped = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    seen = await upstream.calls[0].wait_disconnect(1.0)
    assert seen - stopped < 0.1


@pytest.mark.gen_test(timeout=5)
async def test_thinking_then_content_in_order_with_usage_and_model(upstream, provider_for):
    upstream.plan("m", Script(reasoning=["Let me ", "think."], content=["Hel", "lo ", "there", "!"],
                              reported_model="m-2024-06-01"))
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    assert [(c.thinking, c.text) for c in chunks[:-1]] == [
        ("Let me ", ""), ("think.", ""), ("", "Hel"), ("", "lo "), ("", "there"), ("", "!")]
    last = chunks[-1]
    assert (last.text, last.thinking) == ("", "")
    assert last.usage == {"prompt_tokens": 2, "completion_tokens": 6}   # as the fake server counted them
    assert last.model == "m-2024-06-01"                                   # the model the server reported


@pytest.mark.gen_test(timeout=5)
async def test_reasoning_field_named_reasoning_is_thinking_too(upstream, provider_for):
    upstream.plan("m", Script(reasoning=["hmm"], reasoning_field="reasoning", content=["ok"]))
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    assert [(c.thinking, c.text) for c in chunks if c.thinking or c.text] == [("hmm", ""), ("", "ok")]


@pytest.mark.gen_test(timeout=5)
async def test_sse_comments_between_events_are_ignored(upstream, provider_for):
    upstream.plan("m", Script(content=["a", "b"], comments=True))
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    assert [c.text for c in chunks] == ["a", "b", ""]


@pytest.mark.gen_test(timeout=5)
async def test_think_tags_in_content_are_split_out_across_chunk_boundaries(upstream, provider_for):
    upstream.plan("m", Script(content=["<thi", "nk>\nStep one", ". Step two.\n</th", "ink>\n", "\nThe ans", "wer."]))
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    thinking = "".join(c.thinking for c in chunks)
    text = "".join(c.text for c in chunks)
    assert (thinking, text) == ("Step one. Step two.", "The answer.")
    # every thinking chunk precedes every text chunk
    kinds = [("t" if c.thinking else "x") for c in chunks if c.thinking or c.text]
    assert kinds == sorted(kinds, key=lambda k: k != "t")


@pytest.mark.gen_test(timeout=5)
async def test_think_tags_can_be_turned_off(upstream, provider_for):
    upstream.plan("m", Script(content=["<think>x</think>", "y"]))
    provider = provider_for("m", options={"think_tags": False})
    chunks = await collect(provider, request(provider))
    assert "".join(c.text for c in chunks) == "<think>x</think>y"


@pytest.mark.parametrize("pieces, thinking, text", [
    (["Plain answer"], "", "Plain answer"),
    (["<", "b>bold</b>"], "", "<b>bold</b>"),               # looks like a tag start, is not
    (["Say <think> here"], "", "Say <think> here"),         # only a leading tag counts
    (["<think>never closed"], "never closed", ""),
    (["  <think>a</think>b"], "a", "b"),
    (["<think>a</thi", "nking>b"], "a</thinking>b", ""),  # a near-miss closing tag stays thinking
])
def test_think_splitter(pieces, thinking, text):
    splitter = ThinkSplitter()
    got_text = got_thinking = ""
    for piece in pieces:
        t, th = splitter.feed(piece)
        got_text, got_thinking = got_text + t, got_thinking + th
    t, th = splitter.flush()
    assert (got_thinking + th, got_text + t) == (thinking, text)


@pytest.mark.gen_test(timeout=5)
async def test_chunks_arrive_as_the_upstream_sends_them(upstream, provider_for):
    upstream.plan("m", Script(content=[f"w{i} " for i in range(10)], rate=50))   # ~0.18 s in all
    provider = provider_for("m")
    arrivals, text = [], ""
    async with contextlib.aclosing(provider.stream(request(provider))) as stream:
        async for chunk in stream:
            if chunk.text:
                arrivals.append(time.monotonic())
                text += chunk.text
    # deltas that reach us in one network read come as one chunk; these are 20 ms apart: several chunks
    assert text == "".join(f"w{i} " for i in range(10))
    assert arrivals[-1] - arrivals[0] > 0.12       # not buffered until the end
    assert upstream.calls[0].completed


# --- stop ------------------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=5)
async def test_closing_the_generator_disconnects_upstream_at_once(upstream, provider_for):
    upstream.plan("m", Script(content=[f"w{i} " for i in range(1000)], rate=100))
    provider = provider_for("m")
    stream = provider.stream(request(provider))
    got = ""
    while len(got) < len("w0 w1 w2 "):  # (deltas read together come as one chunk)
        got += (await stream.__anext__()).text
    assert got.startswith("w0 w1 w2 ")
    stopped = time.monotonic()
    await stream.aclose()
    call = upstream.calls[0]
    seen = await call.wait_disconnect(1.0)
    assert seen - stopped < 0.1
    assert not call.completed
    sent = call.chunks_sent
    await asyncio.sleep(0.05)
    assert call.chunks_sent == sent < 10                   # the upstream stopped producing too


@pytest.mark.gen_test(timeout=5)
async def test_cancelling_the_consumer_task_mid_stall_disconnects_upstream(upstream, provider_for):
    # The stream manager's way: a task consuming inside aclosing, cancelled to stop.
    upstream.plan("m", Script(content=["a", "b", "c", "d"], stall_after=2))
    provider = provider_for("m")
    received = []

    async def consume():
        async with contextlib.aclosing(provider.stream(request(provider))) as stream:
            async for chunk in stream:
                received.append(chunk.text)

    task = asyncio.ensure_future(consume())
    while len(received) < 2:
        await asyncio.sleep(0.005)
    await assert_cancel_disconnects_upstream(task, upstream)
    assert received == ["a", "b"]


@pytest.mark.gen_test(timeout=5)
async def test_cancel_before_the_response_headers_disconnects_upstream(upstream, provider_for):
    upstream.plan("m", Script(stall_before_headers=True))
    provider = provider_for("m")
    task = asyncio.ensure_future(collect(provider, request(provider)))
    while not upstream.calls:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)
    await assert_cancel_disconnects_upstream(task, upstream)


# --- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=5)
@pytest.mark.parametrize("script, code, calls", [
    (Script(status=401), "upstream_unauthorized", 1),
    (Script(status=403), "upstream_unauthorized", 1),
    (Script(status=400), "upstream_bad_request", 1),
    (Script(status=429), "upstream_rate_limited", 3),      # retries = 2, then give up
    (Script(status=500), "upstream_error", 3),
    (Script(status=503), "upstream_error", 3),
    (Script(content=[]), "empty_completion", 1),
    (Script(reasoning=["only thoughts"], content=[]), "empty_completion", 1),
])
async def test_error_statuses_map_to_codes(upstream, provider_for, script, code, calls):
    upstream.plan("m", script)
    provider = provider_for("m")
    err, _ = await failure(provider, request(provider))
    assert (err.code, err.status) == (code, "failed")
    assert len(upstream.calls) == calls


@pytest.mark.gen_test(timeout=5)
async def test_unknown_model_is_model_not_found(upstream, provider_for):
    provider = provider_for("no-such-model")     # nothing planned: the fake answers 404 like real servers
    err, _ = await failure(provider, request(provider))
    assert err.code == "upstream_model_not_found"
    assert "no-such-model" in err.detail                        # the upstream's words: for the log
    assert err.message == "the model server does not know this model"   # what viewers see


@pytest.mark.gen_test(timeout=5)
async def test_connection_refused_is_unreachable_after_retries(provider_for):
    provider = provider_for("m", base_url=f"http://127.0.0.1:{closed_port()}/v1")
    started = time.monotonic()
    err, _ = await failure(provider, request(provider))
    assert err.code == "upstream_unreachable"
    assert time.monotonic() - started < 2


@pytest.mark.gen_test(timeout=5)
@pytest.mark.parametrize("script, code", [
    (Script(content=["a", "b", "c"], close_after=2), "upstream_protocol_error"),
    (Script(content=["a", "b", "c"], malformed_after=2), "upstream_protocol_error"),
    (Script(content=["a", "b", "c"], error_after=2), "upstream_error"),
    # A body that ends with neither a finish_reason nor [DONE] is a truncated stream.
    (Script(content=["a", "b"], finish=False, done=False), "upstream_protocol_error"),
    # JSON of the wrong shape is malformed too, not an empty reply.
    (Script(content=["a", "b", "c"], malformed_after=2, malformed='{"choices": "oops"}'),
     "upstream_protocol_error"),
])
async def test_mid_stream_failures_keep_the_text_and_never_retry(upstream, provider_for, script, code):
    upstream.plan("m", script, Script(content=["never", "sent"]))
    provider = provider_for("m")
    err, chunks = await failure(provider, request(provider))
    assert err.code == code
    assert "".join(c.text for c in chunks) == "ab"
    assert len(upstream.calls) == 1                   # text went out: no retry


@pytest.mark.gen_test(timeout=5)
async def test_malformed_first_chunk_is_a_protocol_error_not_an_empty_reply(upstream, provider_for):
    upstream.plan("m", Script(content=["a"], malformed_after=0, malformed='{"choices": "oops"}'))
    provider = provider_for("m", retries=0)
    err, chunks = await failure(provider, request(provider))
    assert (err.code, chunks) == ("upstream_protocol_error", [])
    assert "oops" not in err.message


@pytest.mark.gen_test(timeout=5)
async def test_done_without_finish_reason_but_with_text_is_completed(upstream, provider_for):
    upstream.plan("m", Script(content=["Hel", "lo"], finish=False))   # [DONE] still ends the body
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    assert "".join(c.text for c in chunks) == "Hello"
    assert chunks[-1].usage == {"prompt_tokens": 2, "completion_tokens": 2}
    assert len(upstream.calls) == 1


@pytest.mark.gen_test(timeout=5)
async def test_comment_lines_and_multibyte_text_decode(upstream, provider_for):
    upstream.plan("m", Script(content=["naïve ", "🙂", " done"], comments=True))
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    assert "".join(c.text for c in chunks) == "naïve 🙂 done"


class SplitBody:
    """A response whose body arrives in arbitrary pieces (TCP may cut anywhere, even inside a character)."""

    def __init__(self, body, size):
        self.pieces = [body[i:i + size] for i in range(0, len(body), size)]

    async def aiter_bytes(self):
        for piece in self.pieces:
            yield piece


@pytest.mark.gen_test(timeout=5)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
async def test_sse_events_survive_any_split_and_crlf(size):
    body = ': keep-alive\r\n\r\ndata: {"a": "é🙂"}\r\n\r\nevent: x\ndata: {"b":\ndata: 1}\n\ndata: [DONE]'.encode()
    events = [e async for e in _sse_data(SplitBody(body, size))]
    assert events == ['{"a": "é🙂"}'.encode(), b'{"b":\n1}', b"[DONE]"]


@pytest.mark.gen_test(timeout=5)
@pytest.mark.parametrize("first", [
    Script(status=429, retry_after="0"),
    Script(status=502),
    Script(close_after=0),                             # headers, then the connection drops: nothing sent yet
    Script(error_after=0),
])
async def test_retry_before_the_first_token_then_succeed(upstream, provider_for, first):
    upstream.plan("m", first, first, Script(content=["fine"]))
    provider = provider_for("m")
    chunks = await collect(provider, request(provider))
    assert "".join(c.text for c in chunks) == "fine"
    assert len(upstream.calls) == 3
    assert upstream.calls[0].body == upstream.calls[2].body


@pytest.mark.gen_test(timeout=5)
async def test_no_retry_when_retries_is_zero(upstream, provider_for):
    upstream.plan("m", Script(status=429), Script(content=["fine"]))
    provider = provider_for("m", retries=0)
    err, _ = await failure(provider, request(provider))
    assert err.code == "upstream_rate_limited"
    assert len(upstream.calls) == 1


@pytest.mark.gen_test(timeout=5)
async def test_backoff_grows_between_retries(upstream, provider_for, caplog):
    upstream.plan("m", Script(status=503))
    provider = provider_for("m", retries=2, retry_backoff=0.05)
    with caplog.at_level(logging.INFO):
        await failure(provider, request(provider))
    # the delays the provider chose: 0.05 s then 0.1 s (+ up to 10 % jitter, logged to 2 decimals); comparing measured gaps with each
    # other failed on a loaded machine, so the gaps are only checked to be at least those delays
    delays = [float(m) for m in re.findall(r"delay=([\d.]+)s", caplog.text)]
    assert len(delays) == 2 and 0.05 <= delays[0] <= 0.06 and 0.1 <= delays[1] <= 0.11, delays
    gaps = [b.started - a.started for a, b in zip(upstream.calls, upstream.calls[1:])]
    assert len(gaps) == 2 and gaps[0] >= 0.049 and gaps[1] >= 0.099


# --- keys ------------------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=5)
async def test_key_comes_from_the_named_environment_variable(upstream, provider_for, monkeypatch):
    upstream.api_key = KEY
    upstream.plan("m", Script(content=["ok"]))
    monkeypatch.setenv("PARLEY_TEST_KEY", KEY)
    provider = provider_for("m", api_key_env="PARLEY_TEST_KEY")
    chunks = await collect(provider, request(provider))
    assert "".join(c.text for c in chunks) == "ok"
    assert upstream.calls[0].headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.gen_test(timeout=5)
async def test_key_can_come_from_the_file_the_variable_name_plus_FILE_names(upstream, provider_for, monkeypatch,
                                                                             tmp_path):
    upstream.api_key = KEY
    upstream.plan("m", Script(content=["ok"]))
    (tmp_path / "key").write_text(KEY + "\n")
    monkeypatch.delenv("PARLEY_TEST_KEY", raising=False)
    monkeypatch.setenv("PARLEY_TEST_KEY_FILE", str(tmp_path / "key"))
    provider = provider_for("m", api_key_env="PARLEY_TEST_KEY")
    chunks = await collect(provider, request(provider))
    assert "".join(c.text for c in chunks) == "ok"
    assert upstream.calls[0].headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.gen_test(timeout=5)
async def test_missing_key_fails_without_calling_upstream(upstream, provider_for, monkeypatch):
    monkeypatch.delenv("PARLEY_TEST_KEY", raising=False)
    upstream.plan("m", Script())
    provider = provider_for("m", api_key_env="PARLEY_TEST_KEY")
    err, _ = await failure(provider, request(provider))
    assert err.code == "missing_api_key"
    assert "PARLEY_TEST_KEY" in err.detail and "PARLEY_TEST_KEY" not in err.message  # the log's, not viewers'
    assert upstream.calls == []


@pytest.mark.gen_test(timeout=5)
async def test_keyless_pipeline_never_sends_openai_api_key(upstream, provider_for, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    upstream.plan("m", Script(content=["ok"]))
    provider = provider_for("m")                    # api_key_env = "": a local server such as Ollama
    await collect(provider, request(provider))
    assert "sk-must-not-leak" not in upstream.calls[0].headers.get("Authorization", "")


@pytest.mark.gen_test(timeout=5)
async def test_rejected_key_is_logged_with_ids_and_never_shown(upstream, provider_for, monkeypatch, caplog):
    upstream.api_key = "sk-the-right-one"
    monkeypatch.setenv("PARLEY_TEST_KEY", KEY)
    provider = provider_for("m", api_key_env="PARLEY_TEST_KEY")
    with caplog.at_level(logging.DEBUG):  # the provider's detail line; the stream manager warns once
        err, _ = await failure(provider, request(provider))
    assert err.code == "upstream_unauthorized"
    assert "Incorrect API key" in err.detail and KEY not in err.detail     # the fake echoed it; we scrubbed
    assert err.message == "the model server refused our credentials"      # viewers never see upstream text
    records = [r for r in caplog.records if r.name == "services.providers.openai_compat"]
    assert records
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in logged
    assert "pipeline=p1 session=s-42 message=msg-7 code=upstream_unauthorized" in logged


# --- the request the upstream receives -------------------------------------------------------------------------

def conversation(n):
    return [Turn("user" if i % 2 == 0 else "assistant", f"turn {i}", "bob") for i in range(n)]


@pytest.mark.gen_test(timeout=5)
async def test_request_carries_system_prompt_window_prompt_and_parameters(upstream, provider_for):
    upstream.plan("m", Script(content=["ok"]))
    provider = provider_for("m", system_prompt="Be brief.", history_messages=4, temperature=0.3, max_tokens=77)
    await collect(provider, request(provider, "the new one", history=conversation(10)))
    body = upstream.calls[0].body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "turn 6"}, {"role": "assistant", "content": "turn 7"},
        {"role": "user", "content": "turn 8"}, {"role": "assistant", "content": "turn 9"},
        {"role": "user", "content": "the new one"},
    ]
    assert (body["model"], body["stream"], body["temperature"], body["max_tokens"]) == ("m", True, 0.3, 77)
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.gen_test(timeout=5)
async def test_history_chars_keeps_the_most_recent_turns_that_fit(upstream, provider_for):
    upstream.plan("m", Script(content=["ok"]))
    history = [Turn("user", "u" * 50), Turn("assistant", "a" * 50), Turn("user", "short q"),
               Turn("assistant", "short a")]
    provider = provider_for("m", history_messages=10, history_chars=20)
    await collect(provider, request(provider, "now", history=history))
    assert [m["content"] for m in upstream.calls[0].body["messages"]] == ["short q", "short a", "now"]


@pytest.mark.gen_test(timeout=5)
async def test_options_change_the_request(upstream, provider_for):
    upstream.plan("m", Script(content=["ok"]))
    provider = provider_for("m", max_tokens=5, options={
        "include_usage": False, "max_tokens_param": "max_completion_tokens", "extra_body": {"top_k": 20}})
    chunks = await collect(provider, request(provider))
    body = upstream.calls[0].body
    assert "stream_options" not in body and "max_tokens" not in body
    assert (body["max_completion_tokens"], body["top_k"]) == (5, 20)
    assert chunks[-1].usage is None and chunks[-1].model == "m"     # no usage asked: model still recorded


@pytest.mark.parametrize("messages, history_chars, expected", [
    (0, 1000, []),
    (3, 1000, ["turn 8", "turn 9"]),        # window of 3 starts on an assistant turn: dropped
    (10, 0, []),
    (10, 13, ["turn 8", "turn 9"]),         # two turns of 6 characters fit in 13, three do not
])
def test_window(messages, history_chars, expected):
    pipeline = Pipeline(id="p", provider="openai", model="m", history_messages=messages,
                        history_chars=history_chars)
    req = GenerationRequest(pipeline=pipeline, session_id="s", session_type="person", message_id="x",
                            history=conversation(10), prompt=Turn("user", "now"))
    assert [m["content"] for m in build_messages(pipeline, req)] == expected + ["now"]


@pytest.mark.gen_test(timeout=5)
async def test_group_sessions_label_each_speaker(upstream, provider_for):
    upstream.plan("m", Script(content=["ok"]))
    history = [Turn("user", "I like tea", "alice"), Turn("user", "I prefer coffee", "bob[admin]\n"),
               Turn("assistant", "Both are fine.")]
    provider = provider_for("m", system_prompt="You host a chat.")
    await collect(provider, request(provider, "What did bob say?", history=history, session_type="group",
                                    sender="carol"))
    messages = upstream.calls[0].body["messages"]
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("You host a chat.\n\n") and "[alice]: " in messages[0]["content"]
    assert messages[1:] == [
        {"role": "user", "content": "[alice]: I like tea"},
        {"role": "user", "content": "[bobadmin]: I prefer coffee"},   # brackets and newlines cannot forge a label
        {"role": "assistant", "content": "Both are fine."},
        {"role": "user", "content": "[carol]: What did bob say?"},
    ]


@pytest.mark.gen_test(timeout=5)
async def test_person_sessions_are_not_labelled(upstream, provider_for):
    upstream.plan("m", Script(content=["ok"]))
    provider = provider_for("m")
    await collect(provider, request(provider, "hello", history=[Turn("user", "earlier", "alice")]))
    assert upstream.calls[0].body["messages"] == [{"role": "user", "content": "earlier"},
                                                  {"role": "user", "content": "hello"}]


@pytest.mark.gen_test(timeout=5)
async def test_one_provider_serves_concurrent_replies(upstream, provider_for):
    upstream.plan("m", Script(content=[f"{i}" for i in range(20)], rate=200))
    provider = provider_for("m")
    results = await asyncio.gather(*(collect(provider, request(provider, f"q{i}")) for i in range(5)))
    for chunks in results:
        assert "".join(c.text for c in chunks) == "".join(str(i) for i in range(20))
    assert len(upstream.calls) == 5


@pytest.mark.gen_test(timeout=30)
async def test_many_streams_at_once_then_the_pool_serves_the_next_ones(upstream, provider_for):
    # A provider with many replies in flight streams them all at once (each on its own connection), and the
    # connections their ends free serve the next ones.
    n = 138
    upstream.plan("m", Script(content=["a", "b"], stall_after=1))
    provider = provider_for("m")
    firsts = []

    async def first_chunk(i):
        async with contextlib.aclosing(provider.stream(request(provider, f"q{i}"))) as stream:
            firsts.append((await stream.__anext__()).text)
            await asyncio.Event().wait()  # hold the stream open until cancelled

    tasks = [asyncio.ensure_future(first_chunk(i)) for i in range(n)]
    deadline = time.monotonic() + 20
    while len(firsts) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert firsts == ["a"] * n                       # every stream had its first token while all were open
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    upstream.plan("m", Script(content=["ok"]))
    again = await asyncio.gather(*(collect(provider, request(provider)) for _ in range(65)))
    assert all("".join(c.text for c in chunks) == "ok" for chunks in again)
