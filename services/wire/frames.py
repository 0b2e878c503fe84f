"""Builders of server frames (docs/protocol.md): each returns the frame's Struct (services/wire/schema.py), in two
dialects; `schema.encode()` makes their bytes.

`langbot` (plain connections): exactly LangBot's frames and fields. `parley` (connections that opted in with the
`parley.v1` subprotocol or `?protocol=parley.v1`): LangBot's fields plus Parley's, and the extension frames.
A frame depends only on the event and the connection's variant (dialect, stream mode), never on which connection
reads it: LangBot's `connection_id` is the sender's on `user_message` and "" on `response`, as LangBot sends them.

Offsets count Unicode code points of the answer (`offset`) and of the reasoning (`thinking_offset`) separately.
"""
from datetime import datetime, timezone
from types import SimpleNamespace

import msgspec

from services.wire import schema
from services.wire.codes import LIVE, ReplyStatus
from services.wire.schema import (Ack, AckData, Broadcast, Connected, Error, JoinedData, LangBotConnected,
                             LangBotMessage, LangBotResponse, LangBotUserMessage, LeftData, LiveReply, MembersData,
                             MessageData, Pong, Presence, PresenceData, Push, PushData, Reconnect, ReplyData,
                             ReplyError, ResetData, Response, Resumed, ResumedData, ResumedReply, Rewind,
                             RewindData, SessionJoined,
                             SessionLeft, SessionMembers, SessionReset, Status, StatusData, StopAck, StopAckData,
                             UserMessage)

LANGBOT, PARLEY = "langbot", "parley"
SUBPROTOCOL = "parley.v1"
# What a plain LangBot client is ever sent (services/wire/schema.py's LangBotServerFrame); anything else is an
# extension frame.
LANGBOT_TYPES = schema.LANGBOT_TYPES
LANGBOT_FIELDS = schema.LANGBOT_FIELDS


def timestamp(dt=None):
    dt = dt or datetime.now(timezone.utc)
    if dt.tzinfo is None:  # the driver returns naive UTC datetimes unless tz_aware is set
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(timespec="milliseconds")


def chain(text):
    return [{"type": "Plain", "text": text}]


def message_data(doc, *, connection_id=""):
    """A persisted message as history and `user_message` frames show it (plain data: REST bodies and bus events
    carry it; `user_message()` makes the frame). `connection_id` is LangBot's: the connection that sent a user
    message ("" for replies and for messages sent over REST)."""
    data = {
        "id": doc["seq"],
        "role": doc["role"],
        "content": doc.get("content", ""),
        "message_chain": doc.get("chain") or chain(doc.get("content", "")),
        "timestamp": timestamp(doc.get("created_at")),
        "session_id": doc["session_id"],
        "message_id": doc["_id"],
        "seq": doc["seq"],
        "status": doc.get("status"),
        "sender": doc.get("sender"),
    }
    for key in ("thinking", "reply_to", "client_msg_id", "model", "usage", "error", "superseded_by"):
        if doc.get(key):
            data[key] = doc[key]
    data["is_final"] = doc.get("status") not in LIVE
    data["connection_id"] = connection_id
    return data


def langbot_message(*, id, role, content, is_final, timestamp, connection_id="", message_chain=None):
    """LangBot's message object, exactly its seven fields."""
    return LangBotMessage(id=id, role=role, content=content,
                          message_chain=chain(content) if message_chain is None else message_chain,
                          timestamp=timestamp, is_final=is_final, connection_id=connection_id)


def user_message(data, dialect, session_type, connection_id=""):
    """The echo of a stored user message (`data`: message_data()) to every viewer; `connection_id` is the
    sender's, as LangBot sends it."""
    if dialect == LANGBOT:
        fields = {k: data[k] for k in LANGBOT_FIELDS}
        fields.update(is_final=True, connection_id=connection_id)
        return LangBotUserMessage(session_type=session_type, data=LangBotMessage(**fields))
    return UserMessage(session_type=session_type, data=msgspec.convert(
        {**data, "is_final": True, "connection_id": connection_id}, MessageData))


def _error(error):
    return ReplyError(code=error.get("code"), message=error.get("message"))


def chunk(reply, stream_mode, *, offset, text, thinking_offset, thinking, timestamp, dialect=PARLEY,
          session_type="person"):
    """`text`/`thinking` (the reply's text after the offsets) as one non-final frame (None if nothing).

    `reply`: anything with the text so far (`content`, `thinking`) and its ids (services/delivery/fanout.py's Reply or
    a `snapshot()` of a stored message). Which offsets a connection is sent from is the fan-out's business.
    """
    if dialect == LANGBOT:  # LangBot streams the whole answer so far; reasoning is not shown
        if not text:
            return None
        return LangBotResponse(session_type=session_type, data=langbot_message(
            id=reply.seq, role="assistant", content=reply.content, is_final=False, timestamp=timestamp))
    if not (text or thinking):
        return None
    if stream_mode == "delta":  # once per chunk
        data = ReplyData(id=reply.seq, role="assistant", timestamp=timestamp, is_final=False, connection_id="",
                         session_id=reply.session_id, message_id=reply.message_id, seq=reply.seq,
                         reply_to=reply.reply_to, offset=offset, delta=text)
        if thinking:
            data.thinking_offset, data.thinking_delta = thinking_offset, thinking
    else:  # cumulative: full text so far; `offset` says where this frame's new text starts
        content = reply.content
        data = ReplyData(id=reply.seq, role="assistant", timestamp=timestamp, is_final=False, connection_id="",
                         session_id=reply.session_id, message_id=reply.message_id, seq=reply.seq,
                         reply_to=reply.reply_to, content=content, message_chain=chain(content), offset=offset)
        if reply.thinking:
            data.thinking, data.thinking_offset = reply.thinking, thinking_offset
    return Response(session_type=session_type, data=data)


def final(reply, *, timestamp, dialect=PARLEY, session_type="person"):
    """The one terminal frame of a reply: the same for both stream modes."""
    if dialect == LANGBOT:
        content = reply.content
        # a reply that failed says why, or the user sees nothing
        if reply.status not in (ReplyStatus.COMPLETED, ReplyStatus.STOPPED) and reply.error:
            content += ("\n\n" if content else "") + f"⚠ {reply.error.get('message') or reply.error.get('code')}"
        return LangBotResponse(session_type=session_type, data=langbot_message(
            id=reply.seq, role="assistant", content=content, is_final=True, timestamp=timestamp))
    data = ReplyData(id=reply.seq, role="assistant", timestamp=timestamp, is_final=True, connection_id="",
                     session_id=reply.session_id, message_id=reply.message_id, seq=reply.seq,
                     reply_to=reply.reply_to, content=reply.content, message_chain=chain(reply.content),
                     status=reply.status)
    if reply.thinking:
        data.thinking = reply.thinking
    if reply.error:
        data.error = _error(reply.error)
    if reply.usage:
        data.usage = reply.usage
    if getattr(reply, "continuations", 0):
        data.continued = reply.continuations
    return Response(session_type=session_type, data=data)


def refusal(err, session_type, what="Your message was not accepted"):
    """A refused message (or, for a widget visitor, connection), as a plain LangBot client is told: a final
    assistant reply carrying the reason (not stored; a negative `id` that no stored message has). LangBot's client
    treats any `error` frame as a lost connection."""
    now = datetime.now(timezone.utc)
    content = f"⚠ {what}: {err.message} ({err.code})"
    return LangBotResponse(session_type=session_type, data=langbot_message(
        id=-int(now.timestamp() * 1000), role="assistant", content=content, is_final=True,
        timestamp=timestamp(now)))


def connected(conn, session, *, live_replies=()):
    if conn.dialect == LANGBOT:
        return LangBotConnected(connection_id=conn.id, pipeline_uuid=conn.pipeline, session_type=session["type"],
                                timestamp=timestamp())
    return Connected(connection_id=conn.id, pipeline_uuid=conn.pipeline, session_type=session["type"],
                     session_id=session["_id"], stream_mode=conn.stream_mode, user_id=conn.user_id,
                     protocol="parley/1", dialect=SUBPROTOCOL, live_replies=[live_reply(g) for g in live_replies],
                     timestamp=timestamp())


def embed_connected(conn, bot):
    """A widget visitor's `connected`: LangBot's embed shape, naming the bot, never the pipeline."""
    return LangBotConnected(connection_id=conn.id, bot_uuid=bot, session_type=conn.session_type,
                            timestamp=timestamp())


def snapshot(doc):
    """A stored assistant message, shaped like a Generation for the renderers above."""
    return SimpleNamespace(message_id=doc["_id"], session_id=doc["session_id"], seq=doc["seq"],
                           reply_to=doc.get("reply_to"), status=doc["status"], content=doc.get("content") or "",
                           thinking=doc.get("thinking") or "", error=doc.get("error"), usage=doc.get("usage"),
                           epoch=doc.get("epoch") or 0, continuations=doc.get("continuations") or 0)


def resumed(session_id, replies):
    """The answer to `resume`: each reply that follows, where it resumes from, and its state at that moment."""
    return Resumed(data=ResumedData(session_id=session_id, timestamp=timestamp(), replies=[
        ResumedReply(message_id=r.message_id, seq=r.seq, reply_to=r.reply_to, status=r.status, epoch=r.epoch,
                     offset=offset, thinking_offset=thinking_offset, length=len(r.content),
                     thinking_length=len(r.thinking))
        for r, offset, thinking_offset in replies]))


def live_reply(gen):
    """A reply still queued or streaming, as `connected` lists them: what a reconnecting client may resume."""
    return LiveReply(message_id=gen.message_id, seq=gen.seq, reply_to=gen.reply_to, status=gen.status,
                     length=len(gen.content), thinking_length=len(gen.thinking))


def rewind(reply, *, offset, thinking_offset, reason):
    """Text of a reply this connection was sent past (offset, thinking_offset) is void: it was never stored (its
    instance died or was fenced after its last checkpoint). The reply continues, or ends, from there."""
    return Rewind(data=RewindData(session_id=reply.session_id, message_id=reply.message_id, seq=reply.seq,
                                  reply_to=reply.reply_to, epoch=reply.epoch, offset=offset,
                                  thinking_offset=thinking_offset, reason=reason, timestamp=timestamp()))


def status(reply, at):
    """A reply changed state before its final frame (queued -> streaming): lets every viewer show it."""
    return Status(data=StatusData(session_id=reply.session_id, message_id=reply.message_id, seq=reply.seq,
                                  reply_to=reply.reply_to, status=reply.status, epoch=reply.epoch,
                                  timestamp=timestamp_from_epoch(at)))


def error(err, **context):
    """An `error` frame: the error's code, message and extra fields (retry_after, max_bytes...), and the
    request's context (request_type, client_msg_id; None: not known)."""
    fields = err.to_dict()
    fields.update((k, v) for k, v in context.items() if v is not None)
    return Error(timestamp=timestamp(), **fields)


def pong():
    return Pong(timestamp=timestamp())


def session_joined(session):
    return SessionJoined(data=JoinedData(session_id=session["_id"], session_type=session["type"],
                                         title=session.get("title", "")))


def session_left(session_id, reason):
    """`reason`: left (this connection's `session.leave`), left_group (the user left the group), removed."""
    return SessionLeft(data=LeftData(session_id=session_id, reason=reason))


def session_reset(event):
    return SessionReset(data=ResetData(session_id=event.session_id, deleted=event.deleted,
                                       timestamp=timestamp_from_epoch(event.at)))


def session_members(event):
    """A group's member list changed (a `members` event): the whole list, and who was added or removed by whom."""
    return SessionMembers(data=MembersData(session_id=event.session_id, members=event.members,
                                           added=event.added, removed=event.removed, by=event.by,
                                           timestamp=timestamp_from_epoch(event.at)))


def presence(session_id, event, online, user_id=None):
    """Who views a session (`online`: user ids, every instance's); `event` join/leave names `user_id`."""
    data = PresenceData(session_id=session_id, event=event, online=sorted(online))
    if user_id is not None:
        data.user_id = user_id
    return Presence(data=data)


def broadcast(message, at):
    return Broadcast(message=message, timestamp=timestamp_from_epoch(at))


def push(message, data, at):
    return Push(data=PushData(message=message, data=data), timestamp=timestamp_from_epoch(at))


def reconnect(reason, at=None, retry_after=None):
    """Reconnect (and `resume`): the server is restarting, or the token expired."""
    frame = Reconnect(reason=reason, timestamp=timestamp() if at is None else timestamp_from_epoch(at))
    if retry_after is not None:
        frame.retry_after = retry_after
    return frame


_second = [None, ""]  # the last whole second formatted, and its text up to the seconds
_milli = [None, ""]   # the last millisecond formatted (whole second * 1000 + ms), and its text


def timestamp_from_epoch(seconds):
    """As timestamp(datetime.fromtimestamp(seconds, UTC)), with the part up to the second formatted once a
    second and the whole once a millisecond (a streaming reply asks for one per chunk)."""
    whole = int(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    key = whole * 1000 + micros // 1000
    if _milli[0] == key:
        return _milli[1]
    if _second[0] != whole:
        _second[0], _second[1] = whole, datetime.fromtimestamp(whole, timezone.utc).isoformat()[:19]
    _milli[0], _milli[1] = key, f"{_second[1]}.{micros // 1000:03d}+00:00"
    return _milli[1]


def ack_data(user_doc, reply_doc, duplicate):
    """What the sender learns when a message is accepted (or recognised as a repeat of `client_msg_id`)."""
    data = AckData(session_id=user_doc["session_id"], message_id=user_doc["_id"], seq=user_doc["seq"],
                   reply_message_id=reply_doc["_id"] if reply_doc else None,
                   reply_seq=reply_doc["seq"] if reply_doc else None, duplicate=duplicate)
    if user_doc.get("client_msg_id"):
        data.client_msg_id = user_doc["client_msg_id"]
    return data


def ack(user_doc, reply_doc, duplicate):
    return Ack(data=ack_data(user_doc, reply_doc, duplicate))


def stop_ack(session_id, stopped):
    """The answer to a stop. An empty `stopped` list is the documented no-op: nothing was running."""
    return StopAck(data=StopAckData(session_id=session_id, stopped=stopped, count=len(stopped)))
