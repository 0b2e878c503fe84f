"""Pipelines from TOML: the shipped example loads, and a bad file names the file, the pipeline and the field."""
import logging
import pathlib

import pytest

from services.operations.pipelines import Pipeline, PipelineConfigError, Timeouts, default_pipelines, load_pipelines
from services.wire.errors import NotFound

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "pipelines.example.toml"

GOOD = """
[pipelines.local]
name = "Local"
provider = "openai"
model = "llama3.2"
base_url = "http://127.0.0.1:11434/v1"
"""


@pytest.fixture
def write(tmp_path):
    def write(text, name="pipelines.toml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def test_default_pipelines_without_a_file():
    pipelines = default_pipelines()
    default = pipelines.get("default")
    assert (default.provider, default.model) == ("demo", "demo")
    assert [p.id for p in pipelines] == ["default"]


def test_example_file_loads_with_demo_openai_ollama_and_vllm():
    pipelines = load_pipelines(EXAMPLE)
    by_id = {p.id: p for p in pipelines}
    assert by_id["default"].provider == "demo"
    gpt, llama, r1 = by_id["gpt"], by_id["llama"], by_id["r1"]
    assert (gpt.provider, gpt.base_url, gpt.api_key_env) == ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY")
    assert llama.base_url == "http://127.0.0.1:11434/v1" and llama.api_key_env == ""
    assert r1.base_url.endswith(":8000/v1") and r1.options["extra_body"] == {"top_k": 20}
    assert gpt.timeouts == Timeouts(first_token=60.0, stall=30.0, total=300.0, connect=10.0)
    assert isinstance(gpt.temperature, float) and gpt.max_tokens == 1024 and gpt.history_messages == 20


def test_only_the_files_pipelines_exist(write):
    pipelines = load_pipelines(write(GOOD))
    assert "local" in pipelines and "default" not in pipelines and len(pipelines) == 1
    with pytest.raises(NotFound) as info:
        pipelines.get("default")
    assert info.value.code == "pipeline_not_found"


def test_integers_are_accepted_where_numbers_are_expected(write):
    p = load_pipelines(write(GOOD + "temperature = 1\nretry_backoff = 2\ntimeouts = { stall = 5 }\n")).get("local")
    assert (p.temperature, p.retry_backoff, p.timeouts.stall, p.timeouts.total) == (1.0, 2.0, 5.0, 600.0)
    assert isinstance(p.temperature, float) and isinstance(p.timeouts.stall, float)


def test_public_view_leaks_no_secret_or_configuration():
    p = Pipeline(id="gpt", name="GPT", provider="openai", model="gpt-4o-mini", base_url="https://internal:8443/v1",
                 api_key_env="OPENAI_API_KEY", system_prompt="secret instructions")
    assert p.public() == {"id": "gpt", "name": "GPT", "provider": "openai", "model": "gpt-4o-mini",
                          "inputs": ["text"]}  # what clients may send it (the web app's attach control)


def test_missing_key_variable_is_warned_at_load(write, monkeypatch, caplog):
    monkeypatch.delenv("PARLEY_NOPE_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="services.operations.pipelines"):
        load_pipelines(write(GOOD + 'api_key_env = "PARLEY_NOPE_KEY"\n'))
    assert "PARLEY_NOPE_KEY" in caplog.text and "local" in caplog.text


@pytest.mark.parametrize("extra, field, words", [
    ('colour = "blue"', "colour", "unknown field"),
    ('provider = "anthropic"', "provider", "must be one of demo, openai"),
    ("model = 3", "model", "must be a string, not an integer"),
    ('temperature = "hot"', "temperature", "must be a number, not a string"),
    ("temperature = true", "temperature", "must be a number, not a boolean"),
    ("temperature = 3.5", "temperature", "between 0 and 2"),
    ("max_tokens = 0", "max_tokens", "must be positive"),
    ("max_tokens = 10.5", "max_tokens", "must be an integer"),
    ("history_messages = -1", "history_messages", "0 or more"),
    ("history_chars = true", "history_chars", "must be an integer, not a boolean"),
    ("retries = 99", "retries", "between 0 and 10"),
    ('base_url = "127.0.0.1:11434"', "base_url", "http:// or https://"),
    ("timeouts = { stall = 0 }", "timeouts.stall", "must be positive"),
    ("timeouts = { first_token = \"1m\" }", "timeouts.first_token", "must be a number"),
    ("timeouts = { read = 5 }", "timeouts.read", "unknown field"),
    ("timeouts = 30", "timeouts", "must be a table"),
    ("options = { stream = true }", "options.stream", "unknown option for provider 'openai'"),
    ('options = { max_tokens_param = "tokens" }', "options.max_tokens_param", "max_completion_tokens"),
    ("embed = 3", "embed", "a string (the bot id) or a table"),
    ('embed = "no spaces!"', "embed.bot", "letters, digits"),
    ('embed = { origins = ["https://a.example"] }', "embed.bot", "required"),
    ('embed = { bot = "b", origins = ["https://a.example/path"] }', "embed.origins", "scheme and host, no path"),
    ('embed = { bot = "b", colour = "red" }', "embed.colour", "unknown field"),
    ('embed = { bot = "b", turnstile_site_key = "k" }', "embed.turnstile_secret_env", "needs both"),
    ('embed = { bot = "b", turnstile_site_key = "k", turnstile_secret_env = "0x-secret" }',
     "embed.turnstile_secret_env", "NAME of an environment variable"),
    ('embed = { bot = "b", logo = "missing.png" }', "embed.logo", "cannot read"),
    ('files_url = "parley.example"', "files_url", "http:// or https://"),
])
def test_bad_field_names_file_pipeline_and_field(write, extra, field, words):
    key = extra.split("=")[0].strip()
    base = "".join(line + "\n" for line in GOOD.splitlines() if not line.startswith(key + " "))
    path = write(base + extra + "\n", name="mine.toml")
    with pytest.raises(PipelineConfigError) as info:
        load_pipelines(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": pipeline 'local': field " + repr(field) + ": "), message
    assert words in message
    assert (info.value.pipeline, info.value.field) == ("local", field)


def test_embed_settings_and_their_logo(write, tmp_path):
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    (tmp_path / "notes.txt").write_text("not an image")
    text = GOOD + '[pipelines.local.embed]\nbot = "shop"\norigins = ["https://shop.example", "*"]\nlogo = "logo.png"\n'
    pipelines = load_pipelines(write(text))
    embed = pipelines.get("local").embed
    assert (embed.bot, embed.origins, embed.enabled) == ("shop", ("https://shop.example", "*"), True)
    assert embed.logo == str(tmp_path / "logo.png") and pipelines.for_embed("shop").id == "local"
    assert pipelines.for_embed("local") is None  # a pipeline's id is not a bot id
    off = load_pipelines(write(GOOD + 'embed = { bot = "shop", enabled = false }\n'))
    assert off.for_embed("shop") is None
    with pytest.raises(PipelineConfigError, match="must be a PNG, JPEG, GIF, WebP or SVG"):
        load_pipelines(write(GOOD + 'embed = { bot = "b", logo = "notes.txt" }\n'))
    twice = GOOD + 'embed = "b"\n[pipelines.other]\nembed = "b"\n'
    with pytest.raises(PipelineConfigError, match="same embed bot id"):
        load_pipelines(write(twice))


def test_pasted_key_in_api_key_env_is_refused_without_echoing_it(write):
    key = "sk-proj-AbC123xyz789-secret"
    with pytest.raises(PipelineConfigError) as info:
        load_pipelines(write(GOOD + f'api_key_env = "{key}"\n'))
    assert info.value.field == "api_key_env"
    assert "NAME of an environment variable" in str(info.value)
    assert key not in str(info.value)


@pytest.mark.parametrize("text, pipeline, field, words", [
    ('[pipelines.x]\nprovider = "openai"\nbase_url = "http://h/v1"\n', "x", "model", "required"),
    ('[pipelines.x]\nprovider = "openai"\nmodel = "m"\n', "x", "base_url", "required"),
    ('[pipelines."bad id!"]\n', "bad id!", None, "letters, digits"),
    ("[pipelines]\nx = 1\n", "x", None, "must be a table"),
    ('[pipelines.d]\nprovider = "demo"\noptions = { rate = "fast" }\n', "d", "options.rate", "a number"),
    ('[pipelines.d]\noptions = { words = -1 }\n', "d", "options.words", "0 or more"),
])
def test_bad_pipeline(write, text, pipeline, field, words):
    with pytest.raises(PipelineConfigError) as info:
        load_pipelines(write(text))
    assert (info.value.pipeline, info.value.field) == (pipeline, field)
    assert words in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("", "no pipelines defined"),
    ("[pipelines]\n", "no pipelines defined"),
    ('title = "x"\n' + GOOD, "unknown top-level key 'title'"),
    ("[[pipelines]]\nid = 'x'\n", "no pipelines defined"),
    ("[pipelines.x\nmodel = 1\n", "invalid TOML"),
    ('[pipelines.x]\nmodel = "a"\nmodel = "b"\n', "invalid TOML"),   # duplicate keys: tomllib says where
])
def test_bad_file(write, text, words):
    path = write(text)
    with pytest.raises(PipelineConfigError) as info:
        load_pipelines(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert words in str(info.value)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PipelineConfigError) as info:
        load_pipelines(path)
    assert str(info.value).startswith(f"{path}: cannot read")
