"""Rendering of server frames (docs/protocol.md), in two dialects.

`langbot` (plain connections): exactly LangBot's frames and fields. `parley` (connections that opted in with the
`parley.v1` subprotocol or `?protocol=parley.v1`): LangBot's fields plus Parley's, and the extension frames.
A frame body depends only on the event and the connection's variant (dialect, stream mode), never on which
connection reads it, so a fan-out can render it once per variant.

Offsets count Unicode code points of the answer (`offset`) and of the reasoning (`thinking_offset`) separately.
"""
from datetime import datetime, timezone
from types import SimpleNamespace

from services import hub as _hub  # module, not name: hub imports this module too


LANGBOT, PARLEY = "langbot", "parley"
SUBPROTOCOL = "parley.v1"
# What a plain LangBot client is ever sent; anything else is an extension frame.
LANGBOT_TYPES = frozenset({"connected", "response", "user_message", "pong", "broadcast", "error"})


def timestamp(dt=None):
    dt = dt or datetime.now(timezone.utc)
    if dt.tzinfo is None:  # the driver returns naive UTC datetimes unless tz_aware is set
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(timespec="milliseconds")


def chain(text):
    return [{"type": "Plain", "text": text}]


def message_data(doc, *, connection_id=""):
    """A persisted message as history and `user_message` frames show it. `connection_id` is LangBot's: the
    connection that sent a user message ("" for replies and for messages sent over REST)."""
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
    for key in ("thinking", "reply_to", "client_msg_id", "model", "usage", "error"):
        if doc.get(key):
            data[key] = doc[key]
    data["is_final"] = doc.get("status") not in ("queued", "streaming")
    data["connection_id"] = connection_id
    return data


def langbot_message(*, id, role, content, message_chain, is_final, connection_id="", ts=None):
    """LangBot's message object, exactly its seven fields."""
    return {"id": id, "role": role, "content": content, "message_chain": message_chain,
            "timestamp": ts or timestamp(), "is_final": is_final, "connection_id": connection_id}


def user_message(doc, dialect, session_type, connection_id=""):
    """The echo of a user's message to every viewer; `connection_id` is the sender's (as LangBot sends it)."""
    if dialect == LANGBOT:
        return {"type": "user_message", "session_type": session_type, "data": langbot_message(
            id=doc["seq"], role="user", content=doc.get("content", ""),
            message_chain=doc.get("chain") or chain(doc.get("content", "")), is_final=True,
            connection_id=connection_id, ts=timestamp(doc.get("created_at")))}
    return {"type": "user_message", "session_type": session_type,
            "data": message_data(doc, connection_id=connection_id)}


def _reply_base(gen, *, is_final):
    return {"id": gen.seq, "role": "assistant", "timestamp": timestamp(), "is_final": is_final,
            "connection_id": "", "session_id": gen.session_id, "message_id": gen.message_id,
            "seq": gen.seq, "reply_to": gen.reply_to}


def _session_type(gen, conn):
    return getattr(gen, "session_type", None) or conn.session_type


def delta(gen, conn, *, offset, text, thinking_offset, thinking):
    """One increment of a live reply, published right after `text`/`thinking` were appended at the offsets.

    What a connection gets is decided by its cursor, so it never sees a character twice or misses one: it
    receives everything after its cursor. A delta-mode connection that joined mid-reply has no cursor and gets
    nothing until it sends `resume` (the final frame still carries the whole text); a cumulative frame is
    self-contained, so a cumulative connection simply starts following.
    """
    cursor = conn.cursors.get(gen.message_id)
    if cursor is None:
        if conn.stream_mode == "delta" and (offset or thinking_offset):
            return None
        cursor = conn.cursors[gen.message_id] = _hub.Cursor(gen.session_id)
    return catch_up(gen, conn, cursor)


def catch_up(gen, conn, cursor):
    """Everything of `gen` after `cursor` as one non-final frame (None if nothing); advances the cursor.

    `gen` is a live Generation or a `snapshot()` of a stored message.
    """
    offset, thinking_offset = cursor.offset, cursor.thinking_offset
    text, thinking = gen.content[offset:], gen.thinking[thinking_offset:]
    if not (text or thinking) or (conn.dialect == LANGBOT and not text):
        cursor.offset, cursor.thinking_offset = len(gen.content), len(gen.thinking)
        return None
    cursor.offset, cursor.thinking_offset = len(gen.content), len(gen.thinking)
    return chunk(gen, conn.dialect, conn.stream_mode, _session_type(gen, conn), offset, thinking_offset)


def chunk(gen, dialect, stream_mode, session_type, offset, thinking_offset):
    """A non-final frame of `gen` carrying its text after (offset, thinking_offset)."""
    if dialect == LANGBOT:  # LangBot streams the whole answer so far; reasoning is not shown
        return {"type": "response", "session_type": session_type, "data": langbot_message(
            id=gen.seq, role="assistant", content=gen.content, message_chain=chain(gen.content), is_final=False)}
    text, thinking = gen.content[offset:], gen.thinking[thinking_offset:]
    data = _reply_base(gen, is_final=False)
    if stream_mode == "delta":
        data.update(offset=offset, delta=text)
        if thinking:
            data.update(thinking_offset=thinking_offset, thinking_delta=thinking)
    else:  # cumulative: full text so far; `offset` says where this frame's new text starts
        data.update(content=gen.content, message_chain=chain(gen.content), offset=offset)
        if gen.thinking:
            data.update(thinking=gen.thinking, thinking_offset=thinking_offset)
    return {"type": "response", "session_type": session_type, "data": data}


def final(gen, conn):
    conn.cursors.pop(gen.message_id, None)
    return final_frame(gen, conn.dialect, _session_type(gen, conn))


def final_frame(gen, dialect, session_type):
    """The one final frame of a reply: the whole text and, for Parley, its terminal status."""
    if dialect == LANGBOT:
        content = gen.content
        if gen.status not in ("completed", "stopped") and gen.error:  # say why, or the user sees nothing
            content += ("\n\n" if content else "") + f"⚠ {gen.error.get('message') or gen.error.get('code')}"
        return {"type": "response", "session_type": session_type, "data": langbot_message(
            id=gen.seq, role="assistant", content=content, message_chain=chain(content), is_final=True)}
    data = _reply_base(gen, is_final=True)
    data.update(content=gen.content, message_chain=chain(gen.content), status=gen.status)
    if gen.thinking:
        data["thinking"] = gen.thinking
    if gen.error:
        data["error"] = gen.error
    if gen.usage:
        data["usage"] = gen.usage
    return {"type": "response", "session_type": session_type, "data": data}


def refusal(err, session_type):
    """A refused message, as a plain LangBot client is told: a final assistant reply carrying the reason (not
    stored; a negative `id` that no stored message has). LangBot's client treats any `error` frame as a lost
    connection."""
    content = f"⚠ Your message was not accepted: {err.message} ({err.code})"
    return {"type": "response", "session_type": session_type, "data": langbot_message(
        id=-int(datetime.now(timezone.utc).timestamp() * 1000), role="assistant", content=content,
        message_chain=chain(content), is_final=True)}


def connected(conn, session, *, live_replies=()):
    if conn.dialect == LANGBOT:
        return {"type": "connected", "connection_id": conn.id, "pipeline_uuid": conn.pipeline,
                "session_type": session["type"], "timestamp": timestamp()}
    return {"type": "connected", "connection_id": conn.id, "pipeline_uuid": conn.pipeline,
            "session_type": session["type"], "session_id": session["_id"], "stream_mode": conn.stream_mode,
            "user_id": conn.user_id, "protocol": "parley/1", "dialect": SUBPROTOCOL,
            "live_replies": [live_reply(g) for g in live_replies], "timestamp": timestamp()}


def snapshot(doc, session_type=None):
    """A stored assistant message, shaped like a Generation for the renderers above."""
    return SimpleNamespace(message_id=doc["_id"], session_id=doc["session_id"], seq=doc["seq"],
                           session_type=session_type,
                           reply_to=doc.get("reply_to"), status=doc["status"], content=doc.get("content") or "",
                           thinking=doc.get("thinking") or "", error=doc.get("error"), usage=doc.get("usage"))


def resumed(session_id, replies):
    """The answer to `resume`: each reply that follows, where it resumes from, and its state at that moment."""
    return {"type": "resumed", "data": {"session_id": session_id, "timestamp": timestamp(), "replies": [
        {"message_id": r.message_id, "seq": r.seq, "reply_to": r.reply_to, "status": r.status,
         "offset": offset, "thinking_offset": thinking_offset, "length": len(r.content),
         "thinking_length": len(r.thinking)}
        for r, offset, thinking_offset in replies]}}


def live_reply(gen):
    """A reply still queued or streaming, as `connected` lists them: what a reconnecting client may resume."""
    return {"message_id": gen.message_id, "seq": gen.seq, "reply_to": gen.reply_to, "status": gen.status,
            "length": len(gen.content), "thinking_length": len(gen.thinking)}


def status(gen):
    """A reply changed state before its final frame (queued -> streaming): lets every viewer show it."""
    return {"type": "status", "data": {"session_id": gen.session_id, "message_id": gen.message_id,
                                       "seq": gen.seq, "reply_to": gen.reply_to, "status": gen.status,
                                       "timestamp": timestamp()}}


def error(err, **context):
    body = {"type": "error", **err.to_dict(), "timestamp": timestamp()}
    body.update({k: v for k, v in context.items() if v is not None})
    return body


def timestamp_from_epoch(seconds):
    return timestamp(datetime.fromtimestamp(seconds, timezone.utc))


def ack_data(user_doc, reply_doc, duplicate):
    """What the sender learns when a message is accepted (or recognised as a repeat of `client_msg_id`)."""
    data = {"session_id": user_doc["session_id"], "message_id": user_doc["_id"], "seq": user_doc["seq"],
            "reply_message_id": reply_doc["_id"] if reply_doc else None,
            "reply_seq": reply_doc["seq"] if reply_doc else None, "duplicate": duplicate}
    if user_doc.get("client_msg_id"):
        data["client_msg_id"] = user_doc["client_msg_id"]
    return data


def ack(user_doc, reply_doc, duplicate):
    return {"type": "ack", "data": ack_data(user_doc, reply_doc, duplicate)}


def stop_ack(session_id, stopped):
    """The answer to a stop. An empty `stopped` list is the documented no-op: nothing was running."""
    return {"type": "stop_ack", "data": {"session_id": session_id, "stopped": stopped, "count": len(stopped)}}
