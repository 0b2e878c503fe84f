"""One table each for error codes, reply error codes, close codes and reply statuses (services/wire/codes.py): the
docs' tables, the metrics' label values and static/protocol.js are checked against them (or generated from them),
and no code is written out anywhere else."""
import re
from pathlib import Path

import pytest

from services.operations import metrics

from services.wire import schema
from services.wire.codes import LIVE, TERMINAL, Close, Code, ReplyCode, ReplyStatus
from services.wire.errors import BadRequest, NotFound, ParleyError

ROOT = Path(__file__).resolve().parent.parent


def table(doc, heading, first_column):
    """The rows (lists of cells) of the first table after `heading` whose header starts with `first_column`."""
    text = (ROOT / doc).read_text()
    text = text[text.index(heading):]
    text = text[text.index(f"| {first_column} |"):]
    lines = []
    for line in text.splitlines()[2:]:
        if not line.startswith("|"):
            break
        lines.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return lines


def test_the_error_code_table_is_protocol_md_s():
    rows = {r[0].strip("`"): tuple(r[1:4]) for r in table("docs/protocol.md", "## Error codes", "code | HTTP")}
    declared = {c.value: (str(c.status) if c.rest else "—", "yes" if c.retryable else "", "yes" if c.langbot else "")
                for c in Code}
    assert rows == declared


def test_the_reply_error_table_is_protocol_md_s():
    rows = {r[0].strip("`"): r[1] for r in table("docs/protocol.md", "Reply errors", "code | status")}
    assert rows == {c.value: c.status.value for c in ReplyCode}


def test_the_close_code_table_is_protocol_md_s():
    rows = {int(r[0]) for r in table("docs/protocol.md", "## Close codes", "code | when")}
    assert rows == {c.value for c in Close}
    text = (ROOT / "docs/protocol.md").read_text()
    assert ", ".join(str(c.value) for c in Close if not c.retry).replace(", 4404", " and 4404") in text


def test_generated_files_are_current():
    """docs/asyncapi.yaml (compared as data in test_schema.py) and static/protocol.js."""
    for path, generate in schema.GENERATED.items():
        if path.endswith(".js"):
            stale = f"{path} is stale: `.venv/bin/python -m services.wire.schema`"
            assert (ROOT / path).read_text() == generate(), stale
    assert [c.value for c in Close if not c.retry] == [1000, 4400, 4401, 4403, 4404]  # protocol.js NO_RETRY
    js = schema.protocol_js()
    assert all(f'"{s.name}": "{s.value}"' in js for s in ReplyStatus)


def test_no_code_is_written_out_of_its_table():
    """Error codes are raised by name (Code.X), close codes sent by name (Close.X): a literal anywhere in the
    server's code is a second declaration."""
    found = []
    for path in [ROOT / "server.py", *ROOT.glob("services/**/*.py"), *ROOT.glob("handlers/*.py")]:
        if path.name == "codes.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if (re.search(r'code=["\'][a-z_]+["\']|["\']code["\']: *["\'][a-z_]+["\']', line)
                    or re.search(r"close\((1\d\d\d|4\d\d\d)\b|_close\((1\d\d\d|4\d\d\d)\b", line)):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []


def test_an_error_takes_its_status_and_retryable_from_its_code():
    err = BadRequest("too big", code=Code.IMAGE_TOO_LARGE)
    assert (err.http_status, err.retryable) == (413, False)
    busy = NotFound("x", code=Code.SESSION_BUSY)
    assert (busy.http_status, busy.to_dict()["retryable"]) == (429, True)
    with pytest.raises(ValueError):
        ParleyError("a code nobody declared", code="no_such_code")


def test_metrics_label_values_come_from_the_tables_and_operations_md_lists_them():
    assert metrics.TERMINAL == TERMINAL and metrics.GENERATION_STATES == LIVE
    assert set(metrics.PROVIDER_ERRORS) == {c.value for c in ReplyCode if c.status != ReplyStatus.INTERRUPTED} | {
        "other"}
    assert set(metrics.DISCONNECT_REASONS) == {c.disconnect for c in Close if c.disconnect} | {"ping_timeout", "other"}
    text = (ROOT / "docs/operations.md").read_text()
    closed = {
        "parley_connections_closed_total": metrics.CLOSE_REASONS,
        "parley_ws_disconnects_total": metrics.DISCONNECT_REASONS,
        "parley_generations_finished_total": metrics.TERMINAL,
        "parley_generations_active": metrics.GENERATION_STATES,
        "parley_generation_streamed_characters_total": metrics.STREAMED_KINDS,
        "parley_generation_tokens_total": metrics.TOKEN_KINDS,
        "parley_provider_errors_total": metrics.PROVIDER_ERRORS,
        "parley_stop_requests_total": metrics.STOP_OUTCOMES,
        "parley_resumes_total": metrics.RESUME_SOURCES,
        "parley_bus_events_published_total": metrics.BUS_EVENTS,
    }
    missing = {}
    for name, values in closed.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        if lacking := [v for v in values if v != "other" and f"`{v}`" not in row]:
            missing[name] = lacking
    assert missing == {}


def test_the_wire_check_knows_which_codes_a_langbot_client_may_get():
    """tests/conftest.py refuses an error frame answering a LangBot request (or the connect) with a code the table
    does not mark `langbot`; an answer to a Parley frame may carry any."""
    from services.wire import frames
    from tests.conftest import frame_problem
    offset = frames.error(BadRequest("beyond the text", code=Code.INVALID_OFFSET), request_type="stop")
    assert "not marked `langbot`" in frame_problem(offset, None, "langbot")
    assert frame_problem(offset, None, "parley") is None
    assert frame_problem(frames.error(BadRequest("x", code=Code.INVALID_OFFSET), request_type="resume"), None,
                         "langbot") is None
    assert frame_problem(frames.error(BadRequest("x", code=Code.INVALID_PARAM)), None, "langbot") is None
