"""Pipelines: the AI apps clients talk to. Each names a provider, a model and how to call it.

`default_pipelines()` is what runs when no file is given; `load_pipelines(path)` reads a TOML file
(schema in docs/providers.md, example in pipelines.example.toml) and fails start-up with a
`PipelineConfigError` naming the file, the pipeline and the field.

One module of ~370 lines on purpose: a pipeline's fields are declared here once (the `Pipeline` dataclass and
its defaults, `_PIPELINE_FIELDS` with each one's type and check), as services/operations/settings.py declares the
options, so the TOML schema is read in one place.
"""
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field, fields

from services.wire.codes import Code
from services.wire.errors import NotFound

log = logging.getLogger(__name__)

PROVIDERS = ("demo", "openai")
ON_INSTANCE_LOST = ("continue", "interrupt")
# How an OpenAI-compatible upstream is asked to go on with a partial answer (services/providers/openai_compat.py)
CONTINUE_WITH = ("continue_final_message", "prefill", "instruction")
INPUTS = ("text", "image", "voice", "file")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")        # a pipeline id is a URL path segment
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Timeouts:
    first_token: float = 60.0   # seconds from start to the first chunk
    stall: float = 60.0         # longest gap between two chunks
    total: float = 600.0        # whole reply
    connect: float = 10.0       # TCP/TLS connect to the upstream (providers that use the network)


TURNSTILE_VERIFY_URL = "https://challenges.cloudflare.com/turnstile/v0/siteverify"


@dataclass(frozen=True)
class Embed:
    """A pipeline's chat on other sites (docs/langbot.md, "The embed widget"): anonymous visitors reach it as
    `bot`, from pages on `origins`."""
    bot: str                        # the id in the widget's URLs (LangBot's bot_uuid); never the pipeline's id
    enabled: bool = True
    origins: tuple = ()             # page origins (https://shop.example) that may open it; "*": any
    name: str = ""                  # shown in the widget's header
    logo: str = ""                  # an image file (PNG, JPEG, GIF, WebP or SVG), read at start-up
    turnstile_site_key: str = ""    # a human check (Cloudflare Turnstile) before a visitor may chat: both set
    turnstile_secret_env: str = ""  # the NAME of the variable (or <NAME>_FILE) holding the secret
    turnstile_verify_url: str = TURNSTILE_VERIFY_URL


@dataclass(frozen=True)
class Pipeline:
    id: str
    name: str = ""
    provider: str = "demo"
    model: str = ""
    base_url: str = ""
    api_key_env: str = ""       # the *name* of the environment variable holding the key, never the key
    system_prompt: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    history_messages: int = 20  # earlier messages sent as context
    history_chars: int = 16000  # and at most this many characters of them
    retries: int = 2            # retries before the first token (429, 5xx, connect); never after
    retry_backoff: float = 0.5  # first retry delay in seconds; doubles each time, capped
    timeouts: Timeouts = field(default_factory=Timeouts)
    options: dict = field(default_factory=dict)  # provider-specific
    inputs: tuple = ("text",)   # what its model takes besides text: "image", "voice", "file" (message components)
    embed: Embed | None = None  # its chat on other sites, for anonymous visitors (pipelines TOML [pipelines.x.embed])
    files_url: str = ""         # Parley's base URL as the upstream reaches it: images go as signed links, not inline
    # A reply whose instance is lost (killed, hung, drained): another instance goes on with it ("continue"), or it
    # ends `interrupted` ("interrupt"). How a provider continues the partial answer: docs/providers.md.
    on_instance_lost: str = "continue"
    continue_with: str = "instruction"  # openai: continue_final_message (vLLM, SGLang) | prefill (llama.cpp) | ...

    def public(self):
        """What clients may see: no secrets, no environment variable names."""
        return {"id": self.id, "name": self.name or self.id, "provider": self.provider, "model": self.model,
                "inputs": list(self.inputs)}


class Pipelines:
    def __init__(self, pipelines):
        self._by_id = {p.id: p for p in pipelines}
        self._by_bot = {p.embed.bot: p for p in pipelines if p.embed is not None and p.embed.enabled}

    def for_embed(self, bot):
        """The pipeline whose enabled embed settings name `bot`, or None."""
        return self._by_bot.get(bot)

    def get(self, pipeline_id):
        try:
            return self._by_id[pipeline_id]
        except KeyError:
            raise NotFound(f"no pipeline {pipeline_id!r}", code=Code.PIPELINE_NOT_FOUND) from None

    def __iter__(self):
        return iter(self._by_id.values())

    def __contains__(self, pipeline_id):
        return pipeline_id in self._by_id

    def __len__(self):
        return len(self._by_id)


def api_key(pipeline):
    """The pipeline's key: the variable `api_key_env` names, or the file `<api_key_env>_FILE` names (a secrets
    mount, as Docker and Kubernetes provide). None when neither is set or the file cannot be read."""
    name = pipeline.api_key_env
    if not name:
        return None
    if value := os.environ.get(name):
        return value
    path = os.environ.get(name + "_FILE")
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError as exc:
        log.warning("pipeline %s: cannot read %s_FILE (%s)", pipeline.id, name, exc.strerror or exc)
        return None


def embed_secret(embed):
    """The human check's secret: the variable `turnstile_secret_env` names (or its `_FILE`), or None."""
    return api_key(Pipeline(id="embed", api_key_env=embed.turnstile_secret_env))


def default_pipelines():
    return Pipelines([Pipeline(id="default", name="Demo assistant", provider="demo", model="demo",
                               options={"rate": 40, "thinking": True})])


class PipelineConfigError(ValueError):
    """A bad pipelines file. The message names the file, the pipeline and the field; never a field's value
    when that value could be a secret."""

    def __init__(self, path, problem, *, pipeline=None, field=None):
        where = [str(path)]
        if pipeline is not None:
            where.append(f"pipeline {pipeline!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {problem}")
        self.path = str(path)
        self.pipeline = pipeline
        self.field = field


def load_pipelines(path):
    """Read `[pipelines.<id>]` tables from a TOML file. Only the file's pipelines exist afterwards."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise PipelineConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineConfigError(path, f"invalid TOML: {exc}") from None

    for key in doc:
        if key != "pipelines":
            raise PipelineConfigError(path, f"unknown top-level key {key!r} (expected [pipelines.<id>] tables)")
    tables = doc.get("pipelines")
    if not isinstance(tables, dict) or not tables:
        raise PipelineConfigError(path, "no pipelines defined (expected at least one [pipelines.<id>] table)")

    pipelines = []
    for pid, table in tables.items():
        if not ID_RE.match(pid):
            raise PipelineConfigError(path, "id must be 1-64 letters, digits, '_' or '-'", pipeline=pid)
        if not isinstance(table, dict):
            raise PipelineConfigError(path, "must be a table", pipeline=pid)
        pipelines.append(_pipeline(path, pid, table))
    bots = [p.embed.bot for p in pipelines if p.embed is not None]
    if len(bots) != len(set(bots)):
        raise PipelineConfigError(path, "two pipelines have the same embed bot id")
    for p in pipelines:
        if p.embed is not None and p.embed.turnstile_secret_env and embed_secret(p.embed) is None:
            log.warning("pipeline %s: %s (or %s_FILE) is not set: its widget's human check cannot pass",
                        p.id, p.embed.turnstile_secret_env, p.embed.turnstile_secret_env)
        if p.api_key_env and p.api_key_env not in os.environ and p.api_key_env + "_FILE" not in os.environ:
            log.warning("pipeline %s: environment variable %s (or %s_FILE) is not set; its replies will fail "
                        "with missing_api_key", p.id, p.api_key_env, p.api_key_env)
    return Pipelines(pipelines)


# Field checks: the type TOML must give, then an optional predicate with its explanation.
def _str(v):
    return isinstance(v, str)


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_PIPELINE_FIELDS = {
    "name": (_str, "a string", None),
    "provider": (_str, "a string", (lambda v: v in PROVIDERS, f"must be one of {', '.join(PROVIDERS)}")),
    "model": (_str, "a string", None),
    "base_url": (_str, "a string", (lambda v: v == "" or re.match(r"^https?://[^/\s]+", v),
                                    "must be an http:// or https:// URL")),
    "api_key_env": (_str, "a string", (lambda v: v == "" or ENV_NAME_RE.match(v),
                                       "must be the NAME of an environment variable (letters, digits, '_'), "
                                       "never the key itself")),
    "system_prompt": (_str, "a string", None),
    "temperature": (_num, "a number", (lambda v: 0 <= v <= 2, "must be between 0 and 2")),
    "max_tokens": (_int, "an integer", (lambda v: v > 0, "must be positive")),
    "history_messages": (_int, "an integer", (lambda v: v >= 0, "must be 0 or more")),
    "history_chars": (_int, "an integer", (lambda v: v >= 0, "must be 0 or more")),
    "retries": (_int, "an integer", (lambda v: 0 <= v <= 10, "must be between 0 and 10")),
    "retry_backoff": (_num, "a number", (lambda v: 0 <= v <= 60, "must be between 0 and 60 seconds")),
    "timeouts": (lambda v: isinstance(v, dict), "a table", None),
    "options": (lambda v: isinstance(v, dict), "a table", None),
    "inputs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings",
               (lambda v: "text" in v and set(v) <= set(INPUTS), "must list text and any of image, voice, file")),
    "embed": (lambda v: isinstance(v, (str, dict)), "a string (the bot id) or a table", None),
    "files_url": (_str, "a string", (lambda v: v == "" or re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v),
                                     "must be an http:// or https:// URL (Parley's, as the upstream reaches it)")),
    "on_instance_lost": (_str, "a string", (lambda v: v in ON_INSTANCE_LOST,
                                            f"must be one of {', '.join(ON_INSTANCE_LOST)}")),
    "continue_with": (_str, "a string", (lambda v: v in CONTINUE_WITH, f"must be one of {', '.join(CONTINUE_WITH)}")),
}
_TIMEOUT_FIELDS = {f.name for f in fields(Timeouts)}


def _pipeline(path, pid, table):
    known = {f.name for f in fields(Pipeline)} - {"id"}
    assert known == set(_PIPELINE_FIELDS), "keep _PIPELINE_FIELDS in step with Pipeline"
    values = {}
    for key, value in table.items():
        if key not in _PIPELINE_FIELDS:
            raise PipelineConfigError(path, f"unknown field (known: {', '.join(sorted(known))})",
                                      pipeline=pid, field=key)
        type_ok, type_name, rule = _PIPELINE_FIELDS[key]
        # Say what type was given, not the value: api_key_env may hold a pasted key.
        if not type_ok(value):
            raise PipelineConfigError(path, f"must be {type_name}, not {_toml_type(value)}",
                                      pipeline=pid, field=key)
        if rule and not rule[0](value):
            raise PipelineConfigError(path, rule[1], pipeline=pid, field=key)
        values[key] = value

    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    if "retry_backoff" in values:
        values["retry_backoff"] = float(values["retry_backoff"])
    if "timeouts" in values:
        values["timeouts"] = _timeouts(path, pid, values["timeouts"])
    if "inputs" in values:
        values["inputs"] = tuple(values["inputs"])
    if "embed" in values:
        values["embed"] = _embed(path, pid, values["embed"])

    provider = values.get("provider", "demo")
    if provider == "openai":
        if not values.get("model"):
            raise PipelineConfigError(path, "required for provider 'openai'", pipeline=pid, field="model")
        if not values.get("base_url"):
            raise PipelineConfigError(path, "required for provider 'openai' (e.g. https://api.openai.com/v1, "
                                      "http://127.0.0.1:11434/v1)", pipeline=pid, field="base_url")
        _check_options(path, pid, "openai", _OPENAI_OPTIONS, values.get("options", {}))
    elif provider == "demo":
        _check_options(path, pid, "demo", _DEMO_OPTIONS, values.get("options", {}))
    return Pipeline(id=pid, **values)


_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$|^\*$")
_EMBED_FIELDS = {
    "bot": (_str, "a string", (lambda v: ID_RE.match(v), "must be 1-64 letters, digits, '_' or '-'")),
    "enabled": (lambda v: isinstance(v, bool), "true or false", None),
    "origins": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings",
                (lambda v: all(_ORIGIN_RE.match(x) for x in v), "must be page origins (https://shop.example, "
                 "scheme and host, no path) or \"*\"")),
    "name": (_str, "a string", (lambda v: len(v) <= 80, "must be at most 80 characters")),
    "logo": (_str, "a string", None),
    "turnstile_site_key": (_str, "a string", None),
    "turnstile_secret_env": (_str, "a string", (lambda v: v == "" or ENV_NAME_RE.match(v),
                                                "must be the NAME of an environment variable, never the secret")),
    "turnstile_verify_url": (_str, "a string", (lambda v: re.match(r"^https?://[^/\s]+", v),
                                                "must be an http:// or https:// URL")),
}


def _embed(path, pid, value):
    """`embed = "<bot>"`, or a table of Embed's fields (bot required)."""
    table = {"bot": value} if isinstance(value, str) else value
    values = {}
    for key, item in table.items():
        name = f"embed.{key}"
        if key not in _EMBED_FIELDS:
            raise PipelineConfigError(path, f"unknown field (known: {', '.join(sorted(_EMBED_FIELDS))})",
                                      pipeline=pid, field=name)
        type_ok, type_name, rule = _EMBED_FIELDS[key]
        if not type_ok(item):
            raise PipelineConfigError(path, f"must be {type_name}, not {_toml_type(item)}", pipeline=pid, field=name)
        if rule and not rule[0](item):
            raise PipelineConfigError(path, rule[1], pipeline=pid, field=name)
        values[key] = item
    if "bot" not in values:
        raise PipelineConfigError(path, "required: the id the widget's URLs use", pipeline=pid, field="embed.bot")
    if "origins" in values:
        values["origins"] = tuple(values["origins"])
    if bool(values.get("turnstile_site_key")) != bool(values.get("turnstile_secret_env")):
        raise PipelineConfigError(path, "a human check needs both turnstile_site_key and turnstile_secret_env",
                                  pipeline=pid, field="embed.turnstile_secret_env")
    if values.get("logo"):
        logo = os.path.join(os.path.dirname(os.path.abspath(path)), values["logo"])
        try:
            with open(logo, "rb") as f:
                head = f.read(512)
        except OSError as exc:
            raise PipelineConfigError(path, f"cannot read {logo}: {exc.strerror or exc}", pipeline=pid,
                                      field="embed.logo") from None
        if not (head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")) or head[:4] == b"RIFF" and
                head[8:12] == b"WEBP" or b"<svg" in head):
            raise PipelineConfigError(path, "must be a PNG, JPEG, GIF, WebP or SVG image", pipeline=pid,
                                      field="embed.logo")
        values["logo"] = logo
    return Embed(**values)


def _timeouts(path, pid, table):
    values = {}
    for key, value in table.items():
        name = f"timeouts.{key}"
        if key not in _TIMEOUT_FIELDS:
            raise PipelineConfigError(path, f"unknown field (known: {', '.join(sorted(_TIMEOUT_FIELDS))})",
                                      pipeline=pid, field=name)
        if not _num(value):
            raise PipelineConfigError(path, f"must be a number, not {_toml_type(value)}", pipeline=pid, field=name)
        if value <= 0:
            raise PipelineConfigError(path, "must be positive (seconds)", pipeline=pid, field=name)
        values[key] = float(value)
    return Timeouts(**values)


_OPENAI_OPTIONS = {
    "include_usage": (lambda v: isinstance(v, bool), "true or false"),
    "think_tags": (lambda v: isinstance(v, bool), "true or false"),
    "max_tokens_param": (lambda v: v in ("max_tokens", "max_completion_tokens"),
                         "'max_tokens' or 'max_completion_tokens'"),
    "extra_body": (lambda v: isinstance(v, dict), "a table"),
}


_DEMO_OPTIONS = {
    "words": (lambda v: _int(v) and v >= 0, "an integer, 0 or more"),
    "rate": (lambda v: _num(v) and v >= 0, "a number, 0 or more (0 = as fast as possible)"),
    "thinking": (lambda v: isinstance(v, bool) or _int(v) and v >= 0, "true, false, or a word count (0 or more)"),
    "chunk_words": (lambda v: _int(v) and v >= 1, "a positive integer"),
}


def _check_options(path, pid, provider, known, options):
    for key, value in options.items():
        name = f"options.{key}"
        if key not in known:
            raise PipelineConfigError(path, f"unknown option for provider {provider!r} "
                                      f"(known: {', '.join(sorted(known))})", pipeline=pid, field=name)
        ok, expected = known[key]
        if not ok(value):
            raise PipelineConfigError(path, f"must be {expected}", pipeline=pid, field=name)


def _toml_type(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)
