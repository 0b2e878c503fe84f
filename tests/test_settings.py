"""Every option, three ways (flag, PARLEY_* environment, TOML config file), one precedence; bad values exit 2
naming the option; --help shows defaults and units; the README's table is the definition's.

The option list comes from services/operations/settings.py, so a new option is walked through all of this automatically.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import server
from services.operations import settings
from services.operations.settings import OPTIONS, SettingsError

ROOT = Path(__file__).resolve().parent.parent
IDS = [o.name for o in OPTIONS]


def samples(option, tmp_path):
    """Two different valid values: (raw text for a flag or env, TOML value, expected typed value) each."""
    if option.choices:
        return [(c, c, c) for c in option.choices[:2]] if option.choices[0] != option.default else \
            [(c, c, c) for c in (option.choices[1], option.choices[0])]
    kind = option.kind
    if kind is int:
        low = int(option.minimum or 0)
        a, b = [n for n in range(low + 3, low + 9) if n != option.default][:2]
        return [(str(a), a, a), (str(b), b, b)]
    if kind is float:
        return [("2.5", 2.5, 2.5), ("0.75", 0.75, 0.75)]
    if kind is bool:
        return [("true", True, True), ("false", False, False)]
    if kind is tuple:
        return [("https://a.example,https://b.example", ["https://a.example", "https://b.example"],
                 ("https://a.example", "https://b.example")), ("*", ["*"], ("*",))]
    if kind == "file":
        out = []
        for n in (1, 2):
            path = tmp_path / f"{option.name}-{n}.txt"
            path.write_text(f"content {n} of {option.name}\n")
            out.append((str(path), str(path), path.read_text()))
        return out
    assert kind is str, f"tests/test_settings.py does not know how to sample {option.kind!r}: add it"
    return [(f"alpha-{option.name}", f"alpha-{option.name}", f"alpha-{option.name}"),
            (f"beta-{option.name}", f"beta-{option.name}", f"beta-{option.name}")]


def flag(option, raw):
    """The command-line form of a raw value (a boolean is --cluster / --no-cluster)."""
    if option.kind is bool:
        return [option.flag if raw == "true" else "--no-" + option.flag[2:]]
    return [option.flag, raw]


def toml(values):
    """A TOML document of top-level keys (json.dumps writes valid TOML strings, numbers and arrays)."""
    def literal(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)
    return "".join(f"{k} = {literal(v)}\n" for k, v in values.items())


def config_file(tmp_path, values):
    path = tmp_path / "parley.toml"
    path.write_text(toml(values))
    return str(path)


@pytest.mark.parametrize("option", OPTIONS, ids=IDS)
def test_every_option_by_flag_env_and_file(option, tmp_path):
    (raw, value, expected), _ = samples(option, tmp_path)
    assert expected != option.default, "a sample must differ from the default, or the test proves nothing"
    assert getattr(settings.resolve([], {}), option.field) == option.default
    assert getattr(settings.resolve(flag(option, raw), {}), option.field) == expected
    if option.kind is not bool:
        assert getattr(settings.resolve([f"{option.flag}={raw}"], {}), option.field) == expected
    assert getattr(settings.resolve([], {option.env: raw}), option.field) == expected
    path = config_file(tmp_path, {option.name: value})
    assert getattr(settings.resolve(["--config", path], {}), option.field) == expected
    assert getattr(settings.resolve([], {"PARLEY_CONFIG": path}), option.field) == expected


@pytest.mark.parametrize("option", OPTIONS, ids=IDS)
def test_precedence_flag_over_env_over_file_over_default(option, tmp_path):
    (raw_a, value_a, a), (raw_b, value_b, b) = samples(option, tmp_path)
    path = config_file(tmp_path, {option.name: value_a})
    assert getattr(settings.resolve(["--config", path], {option.env: raw_b}), option.field) == b
    assert getattr(settings.resolve(["--config", path, *flag(option, raw_b)], {option.env: raw_a}),
                   option.field) == b
    assert getattr(settings.resolve(flag(option, raw_a), {option.env: raw_b}), option.field) == a


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.secret], ids=[o.name for o in OPTIONS if o.secret])
def test_secrets_come_from_files_three_ways(option, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(f"s3cret-{option.name}\n")  # the trailing newline of `echo … > file` is not part of it
    want = f"s3cret-{option.name}"
    assert getattr(settings.resolve([option.flag + "-file", str(secret)], {}), option.field) == want
    assert getattr(settings.resolve([], {option.env + "_FILE": str(secret)}), option.field) == want
    path = config_file(tmp_path, {option.name + "_file": str(secret)})
    assert getattr(settings.resolve(["--config", path], {}), option.field) == want
    # the file form sits at its level: an environment file beats a config-file value
    path = config_file(tmp_path, {option.name: "from-config"})
    assert getattr(settings.resolve(["--config", path], {option.env + "_FILE": str(secret)}), option.field) == want


def test_some_options_are_secret():
    assert {"token", "jwt_secret"} <= {o.name for o in OPTIONS if o.secret}


def bad_value(option):
    if option.choices:
        return "neither-of-those"
    return {int: "12abc", float: "fast", bool: "maybe", "file": "/nonexistent/parley-test"}.get(option.kind)


CHECKED = [o for o in OPTIONS if bad_value(o)]


@pytest.mark.parametrize("option", CHECKED, ids=[o.name for o in CHECKED])
def test_a_bad_value_names_the_option_and_the_expected_form(option, tmp_path):
    raw = bad_value(option)
    ways = [([], {option.env: raw}, option.env), (["--config", config_file(tmp_path, {option.name: raw})], {},
                                                  option.name)]
    if option.kind is not bool:  # a boolean flag takes no value
        ways.append(([option.flag, raw], {}, option.flag))
    for argv, env, where in ways:
        with pytest.raises(SettingsError) as caught:
            settings.resolve(argv, env)
        message = str(caught.value)
        assert option.flag in message and where in message and "expected" in message, message
        assert option.expected.split(" (")[0].split(" from ")[0] in message, message


def test_numbers_out_of_range_are_refused():
    with pytest.raises(SettingsError, match=r"--port.*from 0 to 65535"):
        settings.resolve(["--port", "70000"], {})
    with pytest.raises(SettingsError, match=r"--max-connections.*>= 1"):
        settings.resolve([], {"PARLEY_MAX_CONNECTIONS": "0"})


def test_a_secret_is_never_echoed_in_an_error(tmp_path):
    with pytest.raises(SettingsError) as caught:
        settings.resolve([], {"PARLEY_TOKEN_FILE": str(tmp_path / "missing")})
    assert "PARLEY_TOKEN_FILE" in str(caught.value) and "readable file" in str(caught.value)
    path = config_file(tmp_path, {"jwt_secret": 12345678})
    with pytest.raises(SettingsError) as caught:
        settings.resolve(["--config", path], {})
    assert "12345678" not in str(caught.value) and "jwt_secret" in str(caught.value)


def test_config_file_problems_are_named(tmp_path):
    path = config_file(tmp_path, {"prot": 1})
    with pytest.raises(SettingsError, match="unknown option 'prot'"):
        settings.resolve(["--config", path], {})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")
    with pytest.raises(SettingsError, match="invalid TOML"):
        settings.resolve(["--config", str(broken)], {})
    with pytest.raises(SettingsError, match="cannot read"):
        settings.resolve(["--config", str(tmp_path / "absent.toml")], {})


def test_config_attribute_names_are_the_ones_the_code_uses():
    config = server.Config()
    for name in ("pipelines_file", "jwt_public_key", "allowed_origins", "auth_timeout", "max_message_size"):
        assert hasattr(config, name)
    assert server.parse_args(["--port", "9"]).port == 9


def run_server(*args, env=None):
    base = {"PATH": "/usr/bin:/bin", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "server.py", *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def test_bad_environment_value_exits_2_without_a_traceback():
    out = run_server(env={"PARLEY_PORT": "abc"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == "parley: option --port: invalid PARLEY_PORT='abc': expected an integer from 0 to 65535"


def test_help_shows_every_option_with_its_default_unit_and_variable():
    out = run_server("--help")
    assert out.returncode == 0
    entries = re.split(r"\n(?=  -)", out.stdout)  # one entry per option, its help may wrap below it
    for o in OPTIONS:
        line = next((" ".join(e.split()) for e in entries if e.strip().startswith((o.flag + " ", o.flag + ","))), None)
        assert line, f"{o.flag} missing from --help"
        assert f"default: {o.describe_default()}" in line and o.env in line, line
        if o.unit:
            assert f"unit: {o.unit}" in line, line
    assert "--config FILE" in out.stdout


def section(text, begin="<!-- options:begin -->", end="<!-- options:end -->"):
    assert begin in text and end in text, "the options table markers are missing"
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def test_readme_options_table_is_the_definition():
    readme = (ROOT / "README.md").read_text()
    assert section(readme) == settings.markdown_table(), \
        "README.md's options table is stale: regenerate it with `python -m services.operations.settings`"


# Flags of other programs that the docs mention (vLLM, llama.cpp, nx-27017's own options).
FOREIGN_FLAGS = {"--api-key", "--reasoning-parser", "--pid-file", "--log-file"}


def test_docs_mention_only_flags_that_exist():
    import client
    ours = {o.flag for o in OPTIONS} | {o.flag + "-file" for o in OPTIONS if o.secret} | {"--config", "--help"}
    theirs = {a for action in client.build_parser()._actions for a in action.option_strings}
    for tool in [*ROOT.glob("scripts/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("nginx/*.py")]:
        theirs |= set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]+)\"", tool.read_text()))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        spans = re.findall(r"```.*?```|`[^`\n]+`", path.read_text(), flags=re.S)
        for flag in {f for span in spans for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", span)}:
            assert flag in ours | theirs | FOREIGN_FLAGS, f"{path.name} documents {flag}, which no program has"


def test_a_misspelt_environment_variable_is_refused_like_a_misspelt_config_key(tmp_path):
    out = run_server("--data-dir", str(tmp_path), env={"PARLEY_PROT": "9000"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("parley: unknown environment variable PARLEY_PROT (did you mean PARLEY_PORT?): no "
                                  "option reads it (`python server.py --help` lists them with their variables)")
    path = config_file(tmp_path, {"prot": 1})
    with pytest.raises(SettingsError, match=r"unknown option 'prot' \(did you mean port\?\)"):
        settings.resolve(["--config", path], {})
    # every option's variable, its _FILE form for secrets, and the variables a pipeline names for its key pass
    known = {o.env: "1" for o in OPTIONS} | {o.env + "_FILE": "f" for o in OPTIONS if o.secret}
    settings.check_environment({**known, "PARLEY_URL": "x", "PARLEY_MY_KEY": "k", "HOME": "/"},
                               also=["PARLEY_MY_KEY"])
    with pytest.raises(SettingsError, match="PARLEY_MY_KEY"):
        settings.check_environment({"PARLEY_MY_KEY": "k"})
