"""One schema for every frame and body: the decoder's errors, and the two published documents.

docs/asyncapi.yaml: validated against the official AsyncAPI 3.0.0 JSON Schema (vendored from npm
`@asyncapi/specs`, see tests/vendor/README.md), checked structurally (every $ref resolves, operations only use
their channel's messages), and every payload schema in it is checked against the JSON Schema meta-schema and used
to validate real frames.
GET /openapi.json: checked with openapi-spec-validator.
"""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from handlers import api
from handlers.base import BaseHandler
from services.wire import schema

ROOT = Path(__file__).resolve().parent.parent


def resolve(doc, ref):
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for v in node.values():
            yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def test_asyncapi_yaml_is_generated_from_the_code():
    on_disk = yaml.safe_load((ROOT / "docs/asyncapi.yaml").read_text())
    assert on_disk == schema.asyncapi(), "docs/asyncapi.yaml is stale: run `.venv/bin/python -m services.wire.schema`"


def asyncapi_meta_validator():
    meta = json.loads((ROOT / "tests/vendor/asyncapi-3.0.0.schema.json").read_text())
    return jsonschema.validators.validator_for(meta)(meta)


def test_asyncapi_document_is_valid_against_the_official_3_0_schema():
    validator = asyncapi_meta_validator()
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(schema.asyncapi())]
    assert errors == []


def test_the_official_asyncapi_schema_refuses_a_broken_document():
    # Proves the vendored meta-schema really checks: a channel with an unknown field and an operation without
    # its required channel are refused.
    doc = json.loads(json.dumps(schema.asyncapi()))
    doc["channels"]["langbot"]["bogus"] = 1
    del next(iter(doc["operations"].values()))["channel"]
    assert len(list(asyncapi_meta_validator().iter_errors(doc))) >= 2


def test_asyncapi_document_is_valid():
    doc = schema.asyncapi()
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["title"] and doc["info"]["version"]
    for ref in refs(doc):
        assert ref.startswith("#/"), ref
        resolve(doc, ref)  # raises KeyError when dangling
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive")
        channel = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), (name, message)
    for name, payload in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(payload)
    assert set(doc["channels"]) == {"langbot", "parley", "embed"}
    langbot = set(doc["channels"]["langbot"]["messages"])
    assert {"LangBotConnected", "LangBotResponse", "LangBotUserMessage", "Pong", "Error"} <= langbot
    assert not {"Ack", "Status", "StopAck", "Presence", "Resumed"} & langbot


def payload_validator(doc, message):
    """A jsonschema validator for one message's payload, $refs resolved inside the AsyncAPI document."""
    registry = Registry().with_resource("urn:asyncapi", Resource(contents=doc, specification=DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": "urn:asyncapi" + message["payload"]["$ref"]}, registry=registry)


def test_asyncapi_payload_schemas_accept_real_frames_and_refuse_extension_fields_for_langbot():
    doc = json.loads(json.dumps(schema.asyncapi()))
    messages = doc["components"]["messages"]
    lb = payload_validator(doc, messages["LangBotResponse"])
    frame = {"type": "response", "session_type": "person", "data": {
        "id": 2, "role": "assistant", "content": "hi", "message_chain": [{"type": "Plain", "text": "hi"}],
        "timestamp": "2026-11-21T10:21:58.567+00:00", "is_final": True, "connection_id": ""}}
    lb.validate(frame)
    frame["data"]["status"] = "completed"
    with pytest.raises(jsonschema.ValidationError):
        lb.validate(frame)
    payload_validator(doc, messages["MessageFrame"]).validate(
        {"type": "message", "message": [{"type": "At", "target": "bot"}, {"type": "Plain", "text": " hi"}]})


def test_openapi_document_passes_the_validator():
    validate_openapi(schema.openapi(api.rest_routes()))


@pytest.mark.gen_test(timeout=20)
async def test_openapi_is_served(fetch):
    code, body = await fetch("/openapi.json")
    assert code == 200 and body == json.loads(json.dumps(schema.openapi(api.rest_routes())))
    validate_openapi(body)


def doc_routes():
    """(METHOD, path) of every row of docs/protocol.md's REST table, placeholders as `{}`."""
    import re
    text = (ROOT / "docs/protocol.md").read_text()
    section = text[text.index("## REST"):]
    section = section[:section.index("\n## ")]
    rows = re.findall(r"^\| `(GET|POST|PATCH|PUT|DELETE) ([^`]+)`", section, re.M)
    return {(m, re.sub(r"<[^>]+>", "{}", path.replace("P/", "/api/v1/pipelines/<pipeline>/").rstrip("/") or "/"))
            for m, path in rows}


def test_the_rest_routes_are_declared_once_and_documented():
    """GET /openapi.json lists exactly the REST routes handlers/api.py serves (its route list and @api), and
    docs/protocol.md's REST table lists them all, plus the operations endpoints (handlers/ops.py)."""
    import re
    from handlers import ops
    served = {(m.upper(), re.sub(r"{[^}]+}", "{}", path)) for path, methods in
              schema.openapi(api.rest_routes())["paths"].items() for m in methods}
    assert ("POST", "/api/v1/pipelines/{}/sessions/{}/leave") in served
    assert ("POST", "/api/v1/files/images") in served
    undeclared = [(p, h.__name__, m) for p, h, *_ in api.rest_routes() for m in schema.HTTP_METHODS
                  if getattr(h, m) is not getattr(BaseHandler, m) and not hasattr(getattr(h, m), "api")]
    assert undeclared == []
    operations = {("GET", p) for p, *_ in ops.default_handlers + ops.metrics_handlers}
    assert doc_routes() == served | operations


@pytest.mark.parametrize("text, code, where", [
    ('{"type": "message", "message": [{"type": "Plain", "text": "\\ud800"}]}', "invalid_json", None),
    ('{"type": "ping", "x": ' + "[" * 5000 + "]" * 5000 + "}", "invalid_json", None),
    ("[" * 100000, "invalid_frame", None),  # not an object: refused before any nesting is read
    ('{"type": "message", "message": [{"type": "Quote", "origin": ' + "[" * 100000, "invalid_message", None),
    ("[]", "invalid_frame", None),
    ('{"type": 3}', "invalid_frame", None),
    ('{"type": "nope"}', "unknown_type", None),
    ('{"type": "message", "message": []}', "invalid_message", "$.message"),
    ('{"type": "message", "message": [{"type": "Face", "id": 1}]}', "unsupported_component", "$.message[0].type"),
    ('{"type": "message", "message": [{"type": "Image", "url": "ftp://x/y.png"}]}', "invalid_message",
     "$.message[0].url"),
    ('{"type": "message", "message": [{"type": "Plain", "text": "' + "x" * 32001 + '"}]}', "message_too_long", None),
    ('{"type": "stop", "session_id": {"$ne": null}}', "invalid_param", "$.session_id"),
    ('{"type": "resume", "offset": -1}', "invalid_param", "$.offset"),
])
def test_the_decoder_names_the_failing_path_with_a_stable_code(text, code, where):
    with pytest.raises(Exception) as caught:
        schema.decode_frame(text)
    assert caught.value.code == code, caught.value.message
    if where:
        assert where in caught.value.message


def test_unknown_fields_are_dropped():
    frame = schema.decode_frame('{"type": "message", "zzz": 1, "message": [{"type": "Plain", "text": "hi", "x": 2}]}')
    assert schema.to_builtins(frame.message) == [{"type": "Plain", "text": "hi"}]


@pytest.mark.gen_test(timeout=20)
async def test_hostile_json_gets_an_error_frame_never_an_internal_error(connect):
    c = await connect()
    for text in ('{"type": "message", "message": [{"type": "Plain", "text": "\\ud800"}]}',
                 '{"type": "message", "message": ' + "[" * 3000 + "]" * 3000 + "}",
                 '{"type": "message", "message": [{"type": "Plain", "text": "hi"}], "session_id": "\\udfff"}'):
        await c.send(text)
        frame = await c.recv()
        assert frame["type"] == "error" and frame["code"] in ("invalid_json", "invalid_message"), frame
    await c.send({"type": "ping"})
    assert (await c.recv())["type"] == "pong"


def test_protocol_md_tables_match_the_schema():
    """The client-frame table, the component table, the fields of each client frame and a heading per server
    frame in docs/protocol.md agree with services/wire/schema.py."""
    import re
    text = (ROOT / "docs/protocol.md").read_text()
    section = text[text.index("## Client frames"):text.index("## Server frames")]
    rows = dict(re.findall(r"^\| `([a-z.]+)` \| (.*?) \|", section, re.M))
    assert set(schema.CLIENT_TYPES) <= set(rows), set(schema.CLIENT_TYPES) - set(rows)
    for struct in schema.CLIENT_STRUCTS:
        for name in struct.__struct_fields__:
            if name != "workspace_uuid":  # LangBot's client sends it; Parley ignores it
                assert f"`{name}`" in rows[struct.__struct_config__.tag], (struct.__struct_config__.tag, name)
    components = set(re.findall(r"^\| `([A-Za-z]+)` \|", section, re.M)) - set(rows)
    assert components == set(schema.COMPONENT_TYPES)
    headings = " ".join(re.findall(r"^### (.*)$", text, re.M))
    for struct in {*schema.ParleyServerFrame.__args__, *schema.LangBotServerFrame.__args__}:
        assert f"`{struct.__struct_config__.tag}`" in headings, struct.__struct_config__.tag


def test_the_wire_check_refuses_what_is_not_its_struct():
    """The suite-wide check (tests/conftest.py frames_are_their_structs) can fail: a dict, a Parley frame for a
    plain LangBot connection, bytes that are not the frame's, a field value outside its declaration."""
    from services.wire import frames
    from tests.conftest import frame_problem
    pong = frames.pong()
    assert frame_problem(pong, schema.encode(pong), "langbot") is None
    assert "not a server frame Struct" in frame_problem({"type": "pong", "timestamp": pong.timestamp})
    ack = frames.stop_ack("s1", [])
    assert frame_problem(ack, None, "parley") is None
    assert "not a frame of the langbot dialect" in frame_problem(ack, None, "langbot")
    assert "not the frame's encoding" in frame_problem(pong, schema.encode(frames.pong()) + b" ", "parley")
    left = frames.session_left("s1", "gone away")  # not one of the declared reasons
    assert "does not match its schema" in frame_problem(left, None, "parley")


def test_type_lists_are_derived_from_the_declarations():
    """Client and server frame types, the dispatch table, the dialect filter and the metrics label sets all come
    from services/wire/schema.py's unions: a type declared there is known everywhere."""
    from services.operations import metrics
    from services.wire import frames, protocol
    client = {schema.frame_type(t) for t in schema.ClientFrame.__args__}
    langbot = {schema.frame_type(t) for t in schema.LangBotServerFrame.__args__}
    server = langbot | {schema.frame_type(t) for t in schema.ParleyServerFrame.__args__}
    assert set(schema.CLIENT_TYPES) == client == set(protocol.HANDLERS)
    assert protocol.QUEUED == {"message", "session.join", "resume", "group.leave", "regenerate"}  # touch the store
    assert set(schema.SERVER_TYPES) == server and "session.members" in server
    assert frames.LANGBOT_TYPES == langbot == {"connected", "response", "user_message", "pong", "broadcast", "error"}
    assert set(metrics.CLIENT_FRAMES) == client | {"unknown", "invalid"}
    assert set(metrics.SERVER_FRAMES) == server | {"other"}
    exposed = {(s.name, s.labels.get("type")) for family in metrics.Metrics().registry.collect()
               for s in family.samples}
    assert {("parley_ws_frames_sent_total", t) for t in server} <= exposed
    assert {("parley_ws_frames_received_total", t) for t in client} <= exposed
