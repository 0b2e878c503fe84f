"""Every server option, declared once: argparse, `PARLEY_*` environment variables, the TOML config file,
`--help` and the README's options table are all built from `OPTIONS`.

Precedence: command-line flag > environment variable > config file (`--config FILE` / `PARLEY_CONFIG`) >
default. A secret option also reads a file: `--jwt-secret-file F`, `PARLEY_JWT_SECRET_FILE=F` or
`jwt_secret_file = "F"` in the config file (a secret given on the command line shows in `ps`).

A bad value names the option and the expected form (`SettingsError`); `server.main` prints it and exits 2.

To add an option: append one `Option(...)` here; `Config` gains the attribute, and the tests walk it through
all three ways and check the README's table.
"""
import argparse
import dataclasses
import difflib
import os
import sys
import tomllib
from dataclasses import dataclass

ENV_PREFIX = "PARLEY_"
# PARLEY_* variables that are not server options; any other PARLEY_* name is a misspelt option
OTHER_VARIABLES = {
    "PARLEY_CONFIG": "the config file (--config)",
    "PARLEY_URL": "client.py: the server's URL",
    "PARLEY_NGINX": "nginx/cluster.py: the nginx binary",
    "PARLEY_TEST_MONGO_URL": "tests: run the suite against this MongoDB",
    "PARLEY_REQUIRE_ALL": "tests: fail, not skip, when a real component is missing",
    "PARLEY_FUZZ_EXAMPLES": "tests: examples per property-based test",
    "PARLEY_REPLYLOG_EXAMPLES": "tests/test_replylog.py: interleavings tried (300)",
    "PARLEY_REPLYLOG_STEPS": "tests/test_replylog.py: steps per interleaving (40)",
    "PARLEY_LANGBOT_WIDGET": "tests: LangBot's widget.js to drive in Chromium (default: its wheel's, from PyPI)",
}


class SettingsError(ValueError):
    """A bad option value or config file; the message says which and what is expected."""


# --- value parsers: raw text (flag, env, file) or a TOML value -> the typed value, or ValueError(expected form)

def _int(value):
    if isinstance(value, bool):
        raise ValueError("an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip().replace("_", ""))
    except ValueError:
        raise ValueError("an integer") from None


def _float(value):
    if isinstance(value, bool):
        raise ValueError("a number")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError("a number") from None


def _str(value):
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("true or false (also 1/0, yes/no, on/off)")


def _list(value):
    """Comma-separated text, or a TOML array of strings -> tuple."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise ValueError("a list of strings")
        items = value
    elif isinstance(value, str):
        items = value.split(",")
    else:
        raise ValueError("a comma-separated list")
    return tuple(v.strip() for v in items if v.strip())


def _file_text(value):
    """A path whose content is the value (a PEM key)."""
    path = _str(value)
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"a readable file ({path}: {exc.strerror or exc})") from None


PARSERS = {int: _int, float: _float, str: _str, bool: _bool, tuple: _list, "file": _file_text}
FORMS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
         tuple: "a comma-separated list", "file": "a readable file"}
KIND_NAMES = {int: "INT", float: "NUMBER", str: "TEXT", bool: "BOOL", tuple: "LIST", "file": "FILE"}


@dataclass(frozen=True)
class Option:
    name: str                 # flag without dashes, snake_case: --max-queued, PARLEY_MAX_QUEUED, max_queued = 8
    kind: object              # int | float | str | bool | tuple (comma list) | "file" (value = the file's text)
    default: object
    help: str
    unit: str = ""            # shown in --help and the docs: s, bytes, characters…
    group: str = "server"
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False      # also readable from a file (--NAME-file, PARLEY_NAME_FILE, name_file = "…")
    optional: bool = False    # None (unset) is a valid value
    attr: str = ""            # Config attribute when it differs from `name`
    metavar: str = ""

    @property
    def field(self):
        return self.attr or self.name

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def env(self):
        return ENV_PREFIX + self.name.upper()

    @property
    def expected(self):
        """The expected form, for error messages and docs."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        form = FORMS[self.kind]
        if self.minimum is not None and self.maximum is not None:
            form += f" from {self.minimum:g} to {self.maximum:g}"
        elif self.minimum is not None:
            form += f" >= {self.minimum:g}"
        return form

    def parse(self, value):
        if value is None and self.optional:
            return None
        if self.optional and isinstance(value, str) and value == "" and self.kind is not tuple:
            return None
        try:
            result = PARSERS[self.kind](value)
        except ValueError as exc:
            detail = str(exc)  # a file's problem is worth more than its form
            raise ValueError(f"expected {detail if self.kind == 'file' else self.expected}") from None
        if self.choices and result not in self.choices:
            raise ValueError(f"expected {self.expected}")
        if self.minimum is not None and result < self.minimum or self.maximum is not None and result > self.maximum:
            raise ValueError(f"expected {self.expected}")
        return result

    def describe_default(self):
        if self.default is None or self.default == ():
            return "none"
        if self.kind is bool:
            return "true" if self.default else "false"
        if self.kind is tuple:
            return ",".join(self.default)
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


KiB = 1024
OPTIONS = (
    Option("host", str, "127.0.0.1", "address to listen on"),
    Option("port", int, 8888, "TCP port to listen on", minimum=0, maximum=65535),
    Option("metrics_port", int, None, "serve /metrics on this port of --metrics-host, for Prometheus only (the "
           "main port then answers 404 for it); none: on the main port", optional=True, minimum=1,
           maximum=65535, metavar="PORT"),
    Option("metrics_host", str, "127.0.0.1", "address of the --metrics-port listener"),
    Option("mongo_url", str, None, "MongoDB URL; without one an embedded nx-27017 runs with its data in --data-dir",
           group="store", optional=True, secret=True, metavar="URL"),
    Option("db_name", str, "parley", "MongoDB database name", group="store"),
    Option("data_dir", str, "data", "directory for the embedded store's data", group="store", metavar="DIR"),
    Option("pipelines", str, None, "pipelines TOML file (see pipelines.example.toml); none: the offline demo "
           "pipeline `default`", attr="pipelines_file", optional=True, metavar="FILE"),
    Option("auth", str, "token", "how clients authenticate", group="auth", choices=("token", "jwt", "none")),
    Option("token", str, None, "token mode: use this token instead of a random one per start", group="auth",
           optional=True, secret=True),
    Option("jwt_secret", str, None, "jwt mode: HS256 shared secret", group="auth", optional=True, secret=True),
    Option("jwt_public_key", "file", None, "jwt mode: RS256 public key (PEM file)", group="auth", optional=True,
           metavar="PEM_FILE"),
    Option("jwt_admin_claim", str, "role", "jwt mode: claim that marks an admin", group="auth"),
    Option("jwt_admin_value", str, "admin", "jwt mode: value of that claim for an admin", group="auth"),
    Option("auth_timeout", float, 10.0, "time a WebSocket has to send its `authenticate` frame", unit="s",
           group="auth", minimum=0.01),
    Option("allowed_origins", tuple, (), "comma-separated origins (https://chat.example) allowed to open "
           "WebSockets besides the server's own; * allows any", group="auth", metavar="ORIGINS"),
    Option("allowed_hosts", tuple, (), "comma-separated host names this server answers to besides loopback "
           "names (DNS-rebinding guard; enforced with --auth none, or in every mode once set); * allows any",
           group="auth", metavar="HOSTS"),
    Option("frame_ancestors", str, "'none'", "who may embed the web app in a frame: the CSP frame-ancestors "
           "sources ('self', https://portal.example); 'none' forbids framing", group="auth", metavar="SOURCES"),
    Option("cors_origins", tuple, (), "comma-separated origins (https://app.example) whose web pages may call the "
           "REST API (CORS, preflight included); * allows any; none: same-origin only", group="auth",
           metavar="ORIGINS"),
    Option("ping_interval", float, 25.0, "time between WebSocket pings (dead peers are found by them)",
           unit="s", group="limits", minimum=0),
    Option("ping_timeout", float, 10.0, "time to wait for a pong before closing the connection", unit="s",
           group="limits", minimum=0),
    Option("max_connections", int, 10_000, "WebSocket connections in total", group="limits", minimum=1),
    Option("max_connections_per_user", int, 32, "WebSocket connections per user", group="limits", minimum=1),
    Option("rate_limit", float, 5.0, "messages per second per user, sustained", unit="messages/s",
           group="limits", minimum=0),
    Option("rate_burst", int, 20, "messages a user may send at once above the rate", unit="messages",
           group="limits", minimum=1),
    Option("max_message_size", int, 64 * KiB, "largest inbound WebSocket frame (larger: close 1009)",
           unit="bytes", group="limits", minimum=1),
    Option("outbox_limit", int, 1024 * KiB, "characters waiting for a slow reader before it is disconnected "
           "(close 4008)", unit="characters", group="limits", minimum=1),
    Option("max_image_size", int, 512 * KiB, "largest image in a message, decoded (larger: `image_too_large`); "
           "the base64 of an image this size needs a REST body (`--max-body-size`) or frame a third larger",
           unit="bytes", group="limits", minimum=1),
    Option("max_document_size", int, 4096 * KiB, "largest document or voice file (upload or inline; larger: "
           "`file_too_large`)", unit="bytes", group="limits", minimum=1),
    Option("file_quota", int, 100 * 1024 * KiB, "bytes of files one user may store (uploads and inline images; "
           "more: `quota_exceeded`)", unit="bytes", group="limits", minimum=0),
    Option("file_link_ttl", float, 3600.0, "how long a signed link to a file (for an upstream model, or an "
           "image in a widget's history) stays valid, at least", unit="s", group="limits", minimum=0.1),
    Option("max_body_size", int, 1024 * KiB, "largest REST request body (larger: 413 before it is read)",
           unit="bytes", group="limits", minimum=1),
    Option("http_idle_timeout", float, 30.0, "time an HTTP connection may take to send its request headers, "
           "or stay idle between requests, before it is closed (slow-header guard)", unit="s", group="limits",
           minimum=0.1),
    Option("body_timeout", float, 30.0, "time a client may take to send a request body", unit="s",
           group="limits", minimum=0.1),
    Option("max_members", int, 256, "members of one group session", unit="users", group="limits", minimum=1,
           maximum=10_000),
    Option("store_timeout", float, 5.0, "longest wait for MongoDB on any operation before `store_unavailable`",
           unit="s", group="store", minimum=0.1),
    Option("send_concurrency", int, 64, "messages being written to MongoDB at once; more wait their turn (a "
           "burst of sends queues instead of timing out in the driver)", unit="messages", group="store",
           minimum=1),
    Option("send_queue", int, 10_000, "messages waiting for their turn to be written before `overloaded`",
           unit="messages", group="store", minimum=0),
    Option("max_queued", int, 8, "replies waiting per session before `session_busy`", unit="replies",
           group="replies", minimum=0),
    Option("checkpoint_interval", float, 1.0, "how often a streaming reply's partial text is saved", unit="s",
           group="replies", minimum=0),
    Option("lease_seconds", float, 30.0, "a reply whose instance stops renewing it for this long is marked "
           "interrupted", unit="s", group="replies", minimum=0.1),
    Option("on_last_viewer_gone", str, "continue", "what a reply does when the last socket viewing its session "
           "closes", group="replies", choices=("continue", "stop")),
    Option("liveness_timeout", float, 1.5, "--cluster: an instance not heard of (its heartbeat in the store) "
           "for this long is gone: another goes on with its replies", unit="s", group="cluster", minimum=0.3),
    Option("instance_id", str, None, "this instance's name in logs, metrics and the store; none: host name:port",
           group="cluster", optional=True, metavar="NAME"),
    Option("cluster", bool, False, "run as one of several instances sharing --mongo-url (a replica set: change "
           "streams)", group="cluster"),
    Option("trusted_proxies", tuple, (), "comma-separated addresses of proxies (nginx) whose X-Real-IP/"
           "X-Forwarded-For name the client; from anyone else those headers are ignored", group="cluster",
           metavar="ADDRESSES"),
    Option("max_continuations", int, 3, "how many times one reply goes on with another instance after its own is "
           "lost; then it ends interrupted", unit="times", group="replies", minimum=0),
    Option("drain_timeout", float, 10.0, "on SIGTERM, how long replies that cannot go on elsewhere (a pipeline "
           "with on_instance_lost = interrupt; a single box) get to finish before they end interrupted", unit="s",
           group="cluster", minimum=0),
    Option("visitor_messages_per_minute", int, 20, "messages one widget visitor may send per minute (bursts of "
           "a quarter of it); more: a reply saying `rate_limited`", unit="messages/min", group="embed", minimum=1),
    Option("visitor_address_messages_per_minute", int, 60, "messages all widget visitors of one address may "
           "send per minute", unit="messages/min", group="embed", minimum=1),
    Option("visitor_connections", int, 5, "WebSocket connections (tabs) of one widget visitor", group="embed",
           minimum=1),
    Option("visitor_connections_per_address", int, 20, "widget WebSocket connections from one address",
           group="embed", minimum=1),
    Option("visitor_sessions_per_address", int, 30, "new widget conversations one address may open per hour",
           unit="per hour", group="embed", minimum=1),
    Option("max_visitor_sessions", int, 100_000, "widget conversations stored at once; beyond, new visitors are "
           "told to come back later", unit="sessions", group="embed", minimum=1),
    Option("visitor_session_ttl", float, 30.0 * 86400, "a widget conversation unused this long is forgotten "
           "(messages and files)", unit="s", group="embed", minimum=0.1),
    Option("visitor_token_ttl", float, 30.0 * 86400, "how long a visitor token (after a human check) stays valid",
           unit="s", group="embed", minimum=0.1),
    Option("log_level", str, "info", "lowest level logged", group="logging",
           choices=("debug", "info", "warning", "error")),
    Option("log_format", str, "text", "text, or json: one JSON object per line", group="logging",
           choices=("text", "json")),
)
GROUPS = {"server": "Server", "store": "Store", "auth": "Authentication", "limits": "Limits",
          "replies": "Replies", "embed": "Widget visitors", "cluster": "Cluster", "logging": "Logging"}


def _check_unique():
    names = [o.name for o in OPTIONS]
    fields_ = [o.field for o in OPTIONS]
    assert len(set(names)) == len(names) and len(set(fields_)) == len(fields_), "duplicate option"
    assert all(o.group in GROUPS for o in OPTIONS)


_check_unique()

# The typed settings object: one attribute per option. Extra attributes are not options.
Config = dataclasses.make_dataclass(
    "Config", [(o.field, object, dataclasses.field(default=o.default)) for o in OPTIONS],
    namespace={"__doc__": "Parley's settings; attribute per `services.operations.settings.OPTIONS` entry.",
               "__module__": "server"})


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog, description="Parley: chat with AI pipelines over WebSocket",
        epilog="Every option also reads PARLEY_<NAME> from the environment and <name> from the --config file; "
               "precedence: flag > environment > config file > default. Secrets also read a file: "
               "--NAME-file, PARLEY_NAME_FILE, name_file.",
        argument_default=argparse.SUPPRESS)  # absent flags stay absent, so the environment can fill them
    p.add_argument("--config", metavar="FILE", help="TOML file of options (keys as in the table: port = 8888); "
                   "env PARLEY_CONFIG")
    groups = {g: p.add_argument_group(title) for g, title in GROUPS.items()}
    for o in OPTIONS:
        details = [f"default: {o.describe_default()}"]
        if o.unit:
            details.append(f"unit: {o.unit}")
        details.append(f"env {o.env}")
        help_ = f"{o.help} ({'; '.join(details)})".replace("%", "%%")
        group = groups[o.group]
        if o.kind is bool:
            group.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, help=help_)
            continue
        kwargs = {"metavar": o.metavar or ("{" + ",".join(o.choices) + "}" if o.choices else KIND_NAMES[o.kind])}
        group.add_argument(o.flag, dest=o.name, help=help_, **kwargs)
        if o.secret:
            group.add_argument(o.flag + "-file", dest=o.name + "_file", metavar="FILE",
                               help=f"read {o.flag} from this file (env {o.env}_FILE)")
    return p


def _read_secret_file(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise ValueError(f"expected a readable file ({path}: {exc.strerror or exc})") from None


def load_file(path):
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: invalid TOML: {exc}") from None
    known = {o.name for o in OPTIONS} | {o.name + "_file" for o in OPTIONS if o.secret}
    for key in doc:
        if key.replace("-", "_") not in known:
            raise SettingsError(f"config file {path}: unknown option {key!r}{_did_you_mean(key, known)}")
    return {key.replace("-", "_"): value for key, value in doc.items()}


def _did_you_mean(name, known):
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_environment(environ=None, also=()):
    """A PARLEY_* variable that names no option is refused, as an unknown config-file key is: a misspelling
    (PARLEY_PROT=9000) would otherwise be ignored in silence. `also`: other names in use (the variables the
    pipelines read their API keys from)."""
    environ = os.environ if environ is None else environ
    known = ({o.env for o in OPTIONS} | {o.env + "_FILE" for o in OPTIONS if o.secret} | set(OTHER_VARIABLES)
             | set(also))
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            raise SettingsError(f"unknown environment variable {name}{_did_you_mean(name, known)}: no option "
                                "reads it (`python server.py --help` lists them with their variables)")


def resolve(argv=None, environ=None):
    """Flags, environment and config file -> Config. Raises SettingsError on any bad value."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    file_values = load_file(config_path) if config_path else {}
    values = {}
    for o in OPTIONS:
        sources = [("flag", o.flag, args.get(o.name)), ("env", o.env, environ.get(o.env)),
                   ("file", f"{o.name} in {config_path}", file_values.get(o.name))]
        if o.secret:  # a secret's file form sits at the same level as its value form, just after it
            sources = [("flag", o.flag, args.get(o.name)), ("flag", o.flag + "-file", args.get(o.name + "_file")),
                       ("env", o.env, environ.get(o.env)), ("env", o.env + "_FILE", environ.get(o.env + "_FILE")),
                       ("file", f"{o.name} in {config_path}", file_values.get(o.name)),
                       ("file", f"{o.name}_file in {config_path}", file_values.get(o.name + "_file"))]
        value = o.default
        for level, where, raw in sources:
            if raw is None:
                continue
            try:
                if where.endswith(("-file", "_FILE", f"_file in {config_path}")):
                    raw = _read_secret_file(_str(raw))
                value = o.parse(raw)
            except ValueError as exc:
                shown = "" if o.secret else f"={raw!r}" if level != "file" else f" = {raw!r}"
                raise SettingsError(f"option {o.flag}: invalid {where}{shown}: {exc}") from None
            break
        values[o.field] = value
    return Config(**values)


def markdown_table():
    """The README's options table (tests/test_settings.py keeps the README equal to it)."""
    rows = ["| Flag | Environment | Config file key | Default | Unit | What it does |", "|---|---|---|---|---|---|"]
    for o in OPTIONS:
        flag = f"`{o.flag}`" + (f", `{o.flag}-file`" if o.secret else "")
        env = f"`{o.env}`" + (f", `{o.env}_FILE`" if o.secret else "")
        what = o.help + (f" ({', '.join(o.choices)})" if o.choices and o.choices[0] not in o.help else "")
        key = f"`{o.name}`" + (f", `{o.name}_file`" if o.secret else "")
        rows.append(f"| {flag} | {env} | {key} | {o.describe_default()} | {o.unit} | {what.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m services.operations.settings > table.md
    sys.stdout.write(markdown_table())
