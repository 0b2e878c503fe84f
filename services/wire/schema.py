"""Every frame and body of the protocol, declared once (docs/protocol.md, docs/langbot.md).

The Structs below are the frames on the wire: client frames are one tagged union decoded in one call (a bad frame
is refused with the failing field's path, unknown fields are dropped); server frames are built as these Structs by
services/wire/frames.py and encoded by msgspec (once per distinct frame: `encode`). Every list of frame types elsewhere
(the client dispatch table, the metrics labels, the LangBot dialect filter, docs/asyncapi.yaml, GET /openapi.json)
is derived from here, never written.

To add a server frame type (say `typing`):
  1. declare `class Typing(Strict, tag="typing")` below and add it to `ParleyServerFrame` (and to
     `LangBotServerFrame` only if a plain LangBot client may see it: LangBot's own frames);
  2. give services/wire/frames.py a builder returning it, and call it where the frame is sent;
  3. document it in docs/protocol.md (a "### `typing`" heading: a test checks) and run
     `python -m services.wire.schema` (regenerates docs/asyncapi.yaml).
To add a client frame type: declare `class TypingFrame(Frame, tag="typing")`, add it to `ClientFrame` (or to
`LangBotClientFrame` if LangBot's client sends it), and give services/wire/protocol.py's ClientProtocol a method
`on_typing` (`on_session_join` for `session.join`): a plain method is answered inline, an `async def` waits its
turn in the connection's inbox. Then docs/protocol.md's client-frame table.
"""
import re
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from services.wire.codes import Code, ReplyStatus, RewindReason
from services.wire.errors import BadRequest

MAX_TEXT = 32_000
MAX_TITLE = 200
MAX_IDS = 256          # user ids in a session's member list, or in one change of it
MAX_RESUME = 64        # replies named in one session-wide `resume`
MAX_COMPONENTS = 64
MAX_URL = 2048
MAX_INLINE = 4 * 1024 * 1024   # characters of base64 in one component (about 3 MB of data)

Id = Annotated[str, Meta(min_length=1, max_length=128, description="an opaque id")]
Count = Annotated[int, Meta(ge=0)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Url = Annotated[str, Meta(max_length=MAX_URL, pattern=r"^$|^https?://", description="http(s) URL")]
Inline = Annotated[str, Meta(max_length=MAX_INLINE, description="base64, or a data: URI")]
Name = Annotated[str, Meta(max_length=256)]
SessionType = Literal["person", "group"]
ReplyStatusValue = Literal[tuple(s.value for s in ReplyStatus)]  # services/wire/codes.py: queued, streaming, a terminal
Timestamp = Annotated[str, Meta(description="ISO 8601 UTC with milliseconds")]


class Frame(Struct, tag_field="type", omit_defaults=True):
    """Client frames: unknown fields are dropped."""


class Strict(Struct, tag_field="type", omit_defaults=True, forbid_unknown_fields=True):
    """Server frames: exactly the declared fields."""


# LangBot's message components (a message chain is a list of them)

class Plain(Struct, tag="Plain", tag_field="type", omit_defaults=True):
    text: Text


class At(Struct, tag="At", tag_field="type", omit_defaults=True):
    target: Union[Annotated[str, Meta(max_length=128)], int]
    display: Name = ""


class AtAll(Struct, tag="AtAll", tag_field="type", omit_defaults=True):
    pass


FileKey = Annotated[str, Meta(max_length=64, description="a stored file's key (POST /api/v1/files/images|documents)")]


class Image(Struct, tag="Image", tag_field="type", omit_defaults=True):
    image_id: Name = ""
    path: FileKey = ""
    url: Url = ""
    base64: Inline = ""


class Voice(Struct, tag="Voice", tag_field="type", omit_defaults=True):
    voice_id: Name = ""
    path: FileKey = ""
    url: Url = ""
    base64: Inline = ""
    length: Count = 0


class File(Struct, tag="File", tag_field="type", omit_defaults=True):
    id: Name = ""
    name: Name = ""
    size: Count = 0
    path: FileKey = ""
    url: Url = ""
    base64: Inline = ""


Quoted = Union[Plain, At, AtAll, Image, Voice, File]


class Quote(Struct, tag="Quote", tag_field="type", omit_defaults=True):
    """A quoted earlier message: its chain is given to the model as context."""
    id: Union[int, Name, None] = None
    sender_id: Union[int, Name, None] = None
    origin: Annotated[list[Quoted], Meta(max_length=MAX_COMPONENTS)] = []


Component = Union[Plain, At, AtAll, Quote, Image, Voice, File]
COMPONENT_TYPES = ("Plain", "At", "AtAll", "Quote", "Image", "Voice", "File")
Chain = Annotated[list[Component], Meta(min_length=1, max_length=MAX_COMPONENTS)]


# Client frames

class MessageFrame(Frame, tag="message"):
    message: Chain
    stream: bool = True
    client_msg_id: Union[Id, None] = None
    session_id: Union[Id, None] = None


class StopFrame(Frame, tag="stop"):
    message_id: Union[Id, None] = None
    session_id: Union[Id, None] = None


class RegenerateFrame(Frame, tag="regenerate"):
    """A new reply to the question that reply `message_id` answered, replacing it (the session's latest)."""
    message_id: Id
    stream: bool = True
    session_id: Union[Id, None] = None


class PingFrame(Frame, tag="ping"):
    pass


class DisconnectFrame(Frame, tag="disconnect"):
    pass


class AuthenticateFrame(Frame, tag="authenticate"):
    token: Union[Annotated[str, Meta(max_length=8192)], None] = None
    workspace_uuid: Union[Name, None] = None  # sent by LangBot's client; ignored


class JoinFrame(Frame, tag="session.join"):
    session_id: Id


class LeaveFrame(Frame, tag="session.leave"):
    session_id: Union[Id, None] = None


class GroupLeaveFrame(Frame, tag="group.leave"):
    session_id: Id


class PresenceFrame(Frame, tag="presence"):
    session_id: Union[Id, None] = None


class Offsets(Struct, omit_defaults=True):
    offset: Count = 0
    thinking_offset: Count = 0
    epoch: Union[Count, None] = None  # the epoch of the text held (status/rewind/resumed say it)


class ResumeFrame(Frame, tag="resume"):
    message_id: Union[Id, None] = None
    offset: Count = 0
    thinking_offset: Count = 0
    epoch: Union[Count, None] = None
    session_id: Union[Id, None] = None
    offsets: Annotated[dict[Id, Offsets], Meta(max_length=MAX_RESUME)] = {}


# What LangBot's own client sends; Parley's dialect adds the rest.
LangBotClientFrame = Union[MessageFrame, StopFrame, PingFrame, DisconnectFrame, AuthenticateFrame]
ClientFrame = Union[LangBotClientFrame, RegenerateFrame, JoinFrame, LeaveFrame, GroupLeaveFrame, PresenceFrame,
                    ResumeFrame]

_decoder = msgspec.json.Decoder(ClientFrame)


def decode_frame(text):
    """One client frame, validated; raises BadRequest with a stable code and the failing path."""
    if isinstance(text, bytes):
        raise BadRequest("frames are JSON text, not binary", code=Code.INVALID_FRAME)
    try:
        return _decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise frame_error(str(exc)) from None
    except (msgspec.DecodeError, RecursionError) as exc:  # lone surrogates, nesting too deep for the decoder
        raise BadRequest(f"the frame is not valid JSON ({exc})", code=Code.INVALID_JSON) from None


def frame_type(frame):
    """The `type` of a frame (a Struct instance or class)."""
    return frame.__struct_config__.tag


class _Typed(Struct):
    type: Any = None


_peek = msgspec.json.Decoder(_Typed)


def peek_type(text):
    """The `type` of a frame that failed validation (a refused `message` is answered differently from other
    errors, and an error names the type it answers), or None."""
    try:
        kind = _peek.decode(text).type
    except (msgspec.DecodeError, RecursionError):
        return None
    return kind[:64] if isinstance(kind, str) else None


def frame_error(detail):
    """Map msgspec's message ("Expected `str`, got `int` - at `$.session_id`") to one of our codes."""
    path = detail.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in detail else "$"
    if path == "$":
        if "missing required field `message`" in detail:
            return BadRequest("a message frame needs a `message` chain", code=Code.INVALID_MESSAGE)
        if "missing required field `type`" in detail or "Expected `object`" in detail:
            return BadRequest("a frame must be a JSON object with a string `type`", code=Code.INVALID_FRAME)
        return BadRequest(f"invalid frame: {detail}", code=Code.INVALID_FRAME)
    if path == "$.type":
        if detail.startswith("Invalid value"):
            return BadRequest(f"unknown frame type ({detail.split(' - ')[0]})", code=Code.UNKNOWN_TYPE)
        return BadRequest("a frame needs a string `type`", code=Code.INVALID_FRAME)
    if path == "$.message" or path.startswith("$.message["):
        if re.fullmatch(r"\$\.message\[\d+\](\.origin\[\d+\])?\.type", path) and detail.startswith("Invalid value"):
            return BadRequest(f"component type not supported ({detail.split(' - ')[0]}; use one of "
                              f"{', '.join(COMPONENT_TYPES)}) at {path}", code=Code.UNSUPPORTED_COMPONENT)
        if "Expected `str` of length <=" in detail and path.endswith(".text"):
            return BadRequest(f"message text is longer than {MAX_TEXT} characters", code=Code.MESSAGE_TOO_LONG)
        return BadRequest(f"invalid message: {detail}", code=Code.INVALID_MESSAGE)
    return BadRequest(f"invalid field: {detail}", code=Code.INVALID_PARAM)


def to_builtins(obj):
    """A decoded Struct back to plain JSON data (what is stored: only the declared fields)."""
    return msgspec.to_builtins(obj)


def decode_chain(data):
    """A stored chain (to_builtins of one that was sent) back to its Structs."""
    return msgspec.convert(data, Chain)


def convert(data, type_, what="body"):
    """Validate already-parsed JSON (a REST body) against a declared type."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        chain_error = " - at `$.message`" in detail or " - at `$.message[" in detail or "field `message`" in detail
        if type_ is MessageSend and chain_error:
            raise frame_error(detail) from None
        if detail.endswith(" - at `$.session_type`"):
            raise BadRequest("session_type must be one of person, group", code=Code.INVALID_SESSION_TYPE) from None
        raise BadRequest(f"invalid {what}: {detail}", code=Code.INVALID_PARAM) from None


def check_id(value, what):
    """Ids are plain strings: anything else (an object such as {"$ne": ...}) never reaches a query. For an id
    that arrives outside a Struct (a path segment, a query argument): the same bounds as `Id`."""
    if not isinstance(value, str) or not value or len(value) > 128:
        raise BadRequest(f"{what} must be a non-empty string of at most 128 characters", code=Code.INVALID_PARAM)
    return value




# REST bodies (Parley's native API; LangBot's /ws/* routes take none but broadcast)

class Body(Struct, omit_defaults=True):
    """REST bodies: unknown fields are dropped."""


class SessionCreate(Body):
    session_type: SessionType = "person"
    title: Annotated[str, Meta(max_length=MAX_TITLE)] = ""
    members: Annotated[list[Id], Meta(max_length=MAX_IDS)] = []


class SessionRename(Body):
    title: Annotated[str, Meta(max_length=MAX_TITLE)]


class MembersChange(Body):
    add: Annotated[list[Id], Meta(max_length=MAX_IDS)] = []
    remove: Annotated[list[Id], Meta(max_length=MAX_IDS)] = []


class MessageSend(Body):
    message: Chain
    stream: bool = True
    client_msg_id: Union[Id, None] = None


class RegenerateBody(Body):
    stream: bool = True


class StopBody(Body):
    message_id: Union[Id, None] = None


class BroadcastBody(Body):
    message: Annotated[str, Meta(min_length=1)]  # bounded by the request body size (admin only)


class PushBody(Body):
    message: Any
    data: Any = None


class FeedbackBody(Body):
    """A widget's rating of a reply (LangBot's widget: `message_id` is the reply's `id`)."""
    message_id: Union[int, Id]
    feedback_type: Literal[1, 2, 3]   # 1 like, 2 dislike, 3 cancel
    session_type: SessionType = "person"


class HumanCheckBody(Body):
    token: Annotated[str, Meta(max_length=4096)] = ""   # what the widget's Turnstile challenge produced


# Server frames, LangBot dialect: exactly LangBot's shapes

# What the server sends back: the chain as stored (a reply's text may exceed a client component's bounds)
ServerChain = Annotated[list[dict[str, Any]], Meta(description="LangBot components, as sent or as stored")]


class LangBotMessage(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """LangBot's message object: exactly its seven fields. Parley's `MessageData` and `ReplyData` extend it."""
    id: int
    role: Literal["user", "assistant"]
    content: str
    message_chain: ServerChain
    timestamp: Timestamp
    is_final: bool
    connection_id: str


LANGBOT_FIELDS = LangBotMessage.__struct_fields__


class LangBotConnected(Strict, tag="connected"):
    """LangBot's: `pipeline_uuid` on a pipeline's socket, `bot_uuid` (never the pipeline) on a widget's."""
    connection_id: str
    session_type: SessionType
    timestamp: Timestamp
    pipeline_uuid: Union[str, UnsetType] = UNSET
    bot_uuid: Union[str, UnsetType] = UNSET


class LangBotUserMessage(Strict, tag="user_message"):
    session_type: SessionType
    data: LangBotMessage


class LangBotResponse(Strict, tag="response"):
    session_type: SessionType
    data: LangBotMessage


class Pong(Strict, tag="pong"):
    timestamp: Timestamp


class Broadcast(Strict, tag="broadcast"):
    message: str
    timestamp: Timestamp


class Error(Strict, tag="error"):
    """`code` is one of docs/protocol.md's error codes; the optional fields say more when they apply."""
    code: str
    message: str
    timestamp: Timestamp
    request_type: Union[str, UnsetType] = UNSET
    client_msg_id: Union[str, UnsetType] = UNSET
    retryable: Union[bool, UnsetType] = UNSET
    retry_after: Union[float, UnsetType] = UNSET
    max_bytes: Union[int, UnsetType] = UNSET      # image_too_large: the limit
    message_id: Union[str, UnsetType] = UNSET     # message_not_found: the one a `resume` named


LangBotServerFrame = Union[LangBotConnected, LangBotUserMessage, LangBotResponse, Pong, Broadcast, Error]


# Server frames, Parley dialect: LangBot's fields plus Parley's, and the extension frames

class LiveReply(Struct, forbid_unknown_fields=True):
    message_id: str
    seq: int
    reply_to: Union[str, None]
    status: ReplyStatusValue
    length: Count
    thinking_length: Count


class Connected(Strict, tag="connected"):
    connection_id: str
    pipeline_uuid: str
    session_type: SessionType
    session_id: str
    stream_mode: Literal["cumulative", "delta"]
    user_id: str
    protocol: Literal["parley/1"]
    dialect: Literal["parley.v1"]
    live_replies: list[LiveReply]
    timestamp: Timestamp


class ReplyError(Struct):
    code: str
    message: str


class MessageData(LangBotMessage, kw_only=True):
    """A stored message (history, `user_message`): LangBot's seven fields plus Parley's."""
    session_id: str
    message_id: str
    seq: int
    status: Union[ReplyStatusValue, None]
    sender: Union[str, None]
    thinking: Union[str, UnsetType] = UNSET
    reply_to: Union[str, UnsetType] = UNSET
    client_msg_id: Union[str, UnsetType] = UNSET
    model: Union[str, UnsetType] = UNSET
    usage: Union[dict[str, Any], UnsetType] = UNSET
    error: Union[ReplyError, UnsetType] = UNSET
    superseded_by: Union[str, UnsetType] = UNSET  # a reply: the regenerated reply that replaced it


class UserMessage(Strict, tag="user_message"):
    session_type: SessionType
    data: MessageData


class ReplyData(LangBotMessage, kw_only=True):
    """One frame of a reply: cumulative (`content`), delta (`delta`/`thinking_delta`) or final (`status`).
    LangBot's fields, but a delta carries no `content` or `message_chain`."""
    role: Literal["assistant"]
    content: Union[str, UnsetType] = UNSET
    message_chain: Union[ServerChain, UnsetType] = UNSET
    session_id: str
    message_id: str
    seq: int
    reply_to: Union[str, None]
    offset: Union[Count, UnsetType] = UNSET
    delta: Union[str, UnsetType] = UNSET
    thinking: Union[str, UnsetType] = UNSET
    thinking_offset: Union[Count, UnsetType] = UNSET
    thinking_delta: Union[str, UnsetType] = UNSET
    status: Union[ReplyStatusValue, UnsetType] = UNSET
    usage: Union[dict[str, Any], UnsetType] = UNSET
    error: Union[ReplyError, UnsetType] = UNSET
    # the final of a reply that went on with another instance after its own was lost: how many times
    continued: Union[Count, UnsetType] = UNSET


class Response(Strict, tag="response"):
    session_type: SessionType
    data: ReplyData


class AckData(Struct, forbid_unknown_fields=True, omit_defaults=True):
    session_id: str
    message_id: str
    seq: int
    reply_message_id: Union[str, None]
    reply_seq: Union[int, None]
    duplicate: bool
    client_msg_id: Union[str, UnsetType] = UNSET


class Ack(Strict, tag="ack"):
    data: AckData


class StatusData(Struct, forbid_unknown_fields=True):
    session_id: str
    message_id: str
    seq: int
    reply_to: Union[str, None]
    status: ReplyStatusValue
    epoch: Count  # which owner streams it: a new one continues it after its instance was lost (`rewind`)
    timestamp: Timestamp


class Status(Strict, tag="status"):
    data: StatusData


class RewindData(Struct, forbid_unknown_fields=True):
    """Text of this reply the connection was sent past `offset` / `thinking_offset` is void (never stored: its
    instance died or was fenced after its last checkpoint): drop it; the reply continues or ends from there."""
    session_id: str
    message_id: str
    seq: int
    reply_to: Union[str, None]
    epoch: Count
    offset: Count
    thinking_offset: Count
    reason: Literal[tuple(r.value for r in RewindReason)]
    timestamp: Timestamp


class Rewind(Strict, tag="rewind"):
    data: RewindData


class StopAckData(Struct, forbid_unknown_fields=True):
    session_id: str
    stopped: list[str]
    count: Count


class StopAck(Strict, tag="stop_ack"):
    data: StopAckData


class ResumedReply(Struct, forbid_unknown_fields=True):
    message_id: str
    seq: int
    reply_to: Union[str, None]
    status: ReplyStatusValue
    epoch: Count
    offset: Count
    thinking_offset: Count
    length: Count
    thinking_length: Count


class ResumedData(Struct, forbid_unknown_fields=True):
    session_id: str
    timestamp: Timestamp
    replies: list[ResumedReply]


class Resumed(Strict, tag="resumed"):
    data: ResumedData


class JoinedData(Struct, forbid_unknown_fields=True):
    session_id: str
    session_type: SessionType
    title: str


class SessionJoined(Strict, tag="session.joined"):
    data: JoinedData


class LeftData(Struct, forbid_unknown_fields=True):
    session_id: str
    reason: Literal["left", "removed", "left_group"]


class SessionLeft(Strict, tag="session.left"):
    data: LeftData


class MembersData(Struct, forbid_unknown_fields=True):
    session_id: str
    members: list[str]
    added: list[str]
    removed: list[str]
    by: Union[str, None]
    timestamp: Timestamp


class SessionMembers(Strict, tag="session.members"):
    data: MembersData


class PresenceData(Struct, forbid_unknown_fields=True, omit_defaults=True):
    session_id: str
    event: Literal["join", "leave", "snapshot"]
    online: list[str]
    user_id: Union[str, UnsetType] = UNSET


class Presence(Strict, tag="presence"):
    data: PresenceData


class PushData(Struct, forbid_unknown_fields=True):
    message: Any
    data: Any


class Push(Strict, tag="push"):
    data: PushData
    timestamp: Timestamp


class Reconnect(Strict, tag="reconnect"):
    reason: Union[str, None]
    timestamp: Union[Timestamp, UnsetType] = UNSET
    retry_after: Union[float, UnsetType] = UNSET


class ResetData(Struct, forbid_unknown_fields=True):
    session_id: str
    deleted: Count
    timestamp: Timestamp


class SessionReset(Strict, tag="session.reset"):
    data: ResetData


ParleyServerFrame = Union[Connected, UserMessage, Response, Ack, Status, Rewind, StopAck, Resumed, SessionJoined,
                          SessionLeft, SessionMembers, SessionReset, Presence, Push, Broadcast, Pong, Reconnect, Error]
SERVER_FRAMES = {"langbot": LangBotServerFrame, "parley": ParleyServerFrame}


# Derived lists: what the rest of the code asks of the declarations above (never written out elsewhere)

CLIENT_STRUCTS = ClientFrame.__args__
LANGBOT_CLIENT = LangBotClientFrame.__args__
CLIENT_TYPES = tuple(frame_type(t) for t in CLIENT_STRUCTS)
LANGBOT_STRUCTS = frozenset(LangBotServerFrame.__args__)    # what a plain LangBot client may be sent
PARLEY_STRUCTS = frozenset(ParleyServerFrame.__args__)
STRUCTS_OF = {"langbot": LANGBOT_STRUCTS, "parley": PARLEY_STRUCTS}
SERVER_STRUCTS = (*ParleyServerFrame.__args__, *(t for t in LangBotServerFrame.__args__ if t not in PARLEY_STRUCTS))
SERVER_TYPES = tuple(dict.fromkeys(frame_type(t) for t in SERVER_STRUCTS))
LANGBOT_TYPES = frozenset(frame_type(t) for t in LANGBOT_STRUCTS)
TYPE_OF = {t: frame_type(t) for t in SERVER_STRUCTS}          # Struct class -> its `type` (per frame sent)
RESPONSES = (Response, LangBotResponse)

encode = msgspec.json.Encoder().encode  # a frame -> the UTF-8 JSON bytes that go on the wire


def check_server_frame(frame, dialect):
    """Validate one server frame (JSON text or data) against its dialect's declaration; raises ValueError."""
    try:
        if isinstance(frame, (str, bytes)):
            return msgspec.json.decode(frame, type=SERVER_FRAMES[dialect])
        return msgspec.convert(frame, SERVER_FRAMES[dialect])
    except msgspec.ValidationError as exc:
        raise ValueError(f"{dialect} frame does not match its schema: {exc}") from None


# Published documents: docs/asyncapi.yaml (WebSocket, both dialects) and GET /openapi.json (REST)

PIPELINE_WS = "/api/v1/pipelines/{pipeline}/ws/connect"
EMBED_WS = "/api/v1/embed/{bot}/ws/connect"


def _components(types, ref_template):
    _, components = msgspec.json.schema_components(types, ref_template=ref_template)
    return components


def _strip(node, key):
    """Drop a keyword everywhere (msgspec's OpenAPI-style `discriminator` is not AsyncAPI Schema's)."""
    if isinstance(node, dict):
        return {k: _strip(v, key) for k, v in node.items() if k != key}
    if isinstance(node, list):
        return [_strip(v, key) for v in node]
    return node


def _query(*names):
    props = {
        "session_type": {"type": "string", "enum": ["person", "group"], "default": "person"},
        "session_id": {"type": "string", "description": "a session (created over REST) instead of the implicit one"},
        "token": {"type": "string", "description": "credentials, for clients that cannot set Authorization"},
        "stream_mode": {"type": "string", "enum": ["cumulative", "delta"], "default": "cumulative"},
        "protocol": {"type": "string", "const": "parley.v1", "description": "opt in to the Parley dialect"},
    }
    return {"ws": {"query": {"type": "object", "properties": {n: props[n] for n in names}}}}


def asyncapi():
    server_structs = {*LangBotServerFrame.__args__, *ParleyServerFrame.__args__}
    structs = sorted({*CLIENT_STRUCTS, *server_structs}, key=lambda t: t.__name__)
    schemas = _strip(_components(structs, "#/components/schemas/{name}"), "discriminator")
    messages = {t.__name__: {"name": t.__struct_config__.tag, "title": f"{t.__struct_config__.tag}",
                             "summary": (t.__doc__ or "").strip().split("\n")[0] or None,
                             "payload": {"$ref": f"#/components/schemas/{t.__name__}"}} for t in structs}
    for m in messages.values():
        if m["summary"] is None:
            del m["summary"]

    def channel(address, description, client, server, query, parameters):
        return {"address": address, "description": description, "parameters": parameters,
                "messages": {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in (*client, *server)},
                "bindings": _query(*query)}

    pipeline = {"pipeline": {"description": "a pipeline id (GET /api/v1/pipelines)"}}
    channels = {
        "langbot": channel(PIPELINE_WS, "LangBot's WebSocket IM dialect: every connection that does not opt in.",
                           LANGBOT_CLIENT, LangBotServerFrame.__args__, ("session_type", "session_id", "token"),
                           pipeline),
        "parley": channel(PIPELINE_WS, "Parley's dialect: the `parley.v1` subprotocol (Sec-WebSocket-Protocol) "
                          "or `?protocol=parley.v1`.", CLIENT_STRUCTS, ParleyServerFrame.__args__,
                          ("session_type", "session_id", "token", "stream_mode", "protocol"), pipeline),
        "embed": channel(EMBED_WS, "A widget's anonymous visitors (LangBot dialect only): `session_id` is the "
                         "widget's own random id, `token` a visitor token; `connected` carries `bot_uuid`, never "
                         "the pipeline.", LANGBOT_CLIENT, LangBotServerFrame.__args__,
                         ("session_type", "session_id", "token"),
                         {"bot": {"description": "an embed bot id (a pipeline's `embed.bot`); never a pipeline's id"}}),
    }
    operations = {}
    for name, client, server in (("langbot", LANGBOT_CLIENT, LangBotServerFrame.__args__),
                                 ("parley", CLIENT_STRUCTS, ParleyServerFrame.__args__),
                                 ("embed", LANGBOT_CLIENT, LangBotServerFrame.__args__)):
        operations[f"{name}Receive"] = {
            "action": "receive", "channel": {"$ref": f"#/channels/{name}"}, "summary": "frames a client sends",
            "messages": [{"$ref": f"#/channels/{name}/messages/{t.__name__}"} for t in client]}
        operations[f"{name}Send"] = {
            "action": "send", "channel": {"$ref": f"#/channels/{name}"}, "summary": "frames the server sends",
            "messages": [{"$ref": f"#/channels/{name}/messages/{t.__name__}"} for t in server]}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Parley WebSocket protocol", "version": "1.0.0",
                 "description": "Generated from services/wire/schema.py by `python -m services.wire.schema`; prose in "
                                "docs/protocol.md and docs/langbot.md."},
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:8888", "protocol": "ws"}},
        "channels": channels, "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def rest_operations(routes):
    """(method, path template, declaration) of every REST method in Tornado route lists (pattern, handler, ...):
    a handler method declared with handlers/base.py's @api (its `api` attribute); the path template is the
    pattern with each named group as `{name}`."""
    for pattern, handler, *_ in routes:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".")
        for method in HTTP_METHODS:
            declared = getattr(getattr(handler, method, None), "api", None)
            if declared is not None:
                yield method, path, declared


def openapi(routes):
    """OpenAPI 3.1 for the REST API: the methods of `routes` (a handlers module's route list) declared with @api."""
    operations = list(rest_operations(routes))
    bodies = sorted({d.body for _, _, d in operations if d.body is not None}, key=lambda t: t.__name__)
    schemas = _components(bodies, "#/components/schemas/{name}")
    schemas["ErrorBody"] = {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "a stable code (docs/protocol.md)"},
        "message": {"type": "string"}}}
    schemas["Envelope"] = {"type": "object", "required": ["code", "msg", "data"], "properties": {
        "code": {"const": 0}, "msg": {"const": "ok"}, "data": {}}}
    paths = {}
    for method, path, declared in operations:
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{(\w+)}", path)]
        op = {"summary": declared.summary,
              "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_') or 'root'}",
              "responses": {str(declared.status): {"description": "ok (LangBot's envelope)", "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
                  "default": {"description": "an error", "content": {
                      "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}}}
        if params:
            op["parameters"] = params
        if (body := declared.body) is not None:
            required = any(f.required for f in msgspec.structs.fields(body))  # else an empty body will do
            op["requestBody"] = {"required": required, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
        if declared.admin:
            op["description"] = "admin only"
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0",
            "info": {"title": "Parley REST API", "version": "1.0.0",
                     "description": "Generated from the route list of handlers/api.py and its methods' @api "
                                    "declarations; prose in docs/protocol.md."},
            "servers": [{"url": "/"}],
            "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}], "paths": paths}


def dump_asyncapi():
    import json

    import yaml  # only the generator and its test need PyYAML
    plain_data = json.loads(json.dumps(asyncapi()))  # no shared nodes, so no YAML anchors
    return yaml.safe_dump(plain_data, sort_keys=False, allow_unicode=True, width=120)


def protocol_js():
    """static/protocol.js: what the web app and parley.js need of services/wire/codes.py's tables (reply statuses,
    close codes, error codes), so that JavaScript never restates them."""
    import json
    from services.wire.codes import LIVE, TERMINAL, Close, Code, ReplyStatus
    table = {"STATUS": {s.name: s.value for s in ReplyStatus}, "LIVE": list(LIVE), "TERMINAL": list(TERMINAL),
             "CLOSE": {c.name: c.value for c in Close}, "NO_RETRY": [c.value for c in Close if not c.retry],
             "ERROR": {c.name: c.value for c in Code}}
    return ("/* static/protocol.js: generated from services/wire/codes.py by `python -m services.wire.schema`; "
            "do not edit\n"
            " * (a test fails when it is stale). NO_RETRY: close codes after which a client should not reconnect\n"
            " * until something changes (credentials, parameters), or that it caused itself (1000). */\n"
            "(function (root, factory) {\n"
            "  if (typeof module === \"object\" && module.exports) module.exports = factory();\n"
            "  else root.ParleyProtocol = factory();\n"
            "})(typeof self !== \"undefined\" ? self : this, function () {\n"
            "  \"use strict\";\n"
            f"  return Object.freeze({json.dumps(table, indent=2).replace(chr(10), chr(10) + '  ')});\n"
            "});\n")


GENERATED = {"docs/asyncapi.yaml": dump_asyncapi, "static/protocol.js": protocol_js}  # path: its generator


if __name__ == "__main__":
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for path, generate in GENERATED.items():
        root.joinpath(path).write_text(generate())
