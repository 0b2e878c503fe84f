"""Rendering of server frames (docs/protocol.md). LangBot-compatible shapes first, Parley's fields added.

Offsets count Unicode code points of the answer (`offset`) and of the reasoning (`thinking_offset`) separately.
"""
from datetime import datetime, timezone
from types import SimpleNamespace



def timestamp(dt=None):
    dt = dt or datetime.now(timezone.utc)
    if dt.tzinfo is None:  # the driver returns naive UTC datetimes unless tz_aware is set
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(timespec="milliseconds")


def chain(text):
    return [{"type": "Plain", "text": text}]


def message_data(doc, *, connection_id=None):
    """A persisted message as history and `user_message` frames show it."""
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
    if doc["role"] == "assistant":
        data["is_final"] = doc.get("status") not in ("queued", "streaming")
    if connection_id:
        data["connection_id"] = connection_id
    return data


def _reply_base(reply, *, is_final, timestamp):
    return {"id": reply.seq, "role": "assistant", "timestamp": timestamp, "is_final": is_final,
            "session_id": reply.session_id, "message_id": reply.message_id, "seq": reply.seq,
            "reply_to": reply.reply_to}


def chunk(reply, stream_mode, *, offset, text, thinking_offset, thinking, timestamp):
    """`text`/`thinking` (the reply's text after the offsets) as one non-final frame (None if nothing).

    `reply`: anything with the text so far (`content`, `thinking`) and its ids (services/fanout.py's Reply or
    a `snapshot()` of a stored message). Which offsets a connection is sent from is the fan-out's business.
    """
    if not (text or thinking):
        return None
    data = _reply_base(reply, is_final=False, timestamp=timestamp)
    if stream_mode == "delta":
        data.update(offset=offset, delta=text)
        if thinking:
            data.update(thinking_offset=thinking_offset, thinking_delta=thinking)
    else:  # cumulative: full text so far; `offset` says where this frame's new text starts
        content = reply.content
        data.update(content=content, message_chain=chain(content), offset=offset)
        if reply.thinking:
            data.update(thinking=reply.thinking, thinking_offset=thinking_offset)
    return {"type": "response", "data": data}


def final(reply, *, timestamp):
    """The one terminal frame of a reply: the same for both stream modes."""
    data = _reply_base(reply, is_final=True, timestamp=timestamp)
    data.update(content=reply.content, message_chain=chain(reply.content), status=reply.status)
    if reply.thinking:
        data["thinking"] = reply.thinking
    if reply.error:
        data["error"] = reply.error
    if reply.usage:
        data["usage"] = reply.usage
    return {"type": "response", "data": data}


def snapshot(doc):
    """A stored assistant message, shaped like a Generation for the renderers above."""
    return SimpleNamespace(message_id=doc["_id"], session_id=doc["session_id"], seq=doc["seq"],
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


def status(event):
    """A reply changed state before its final frame (queued -> streaming): lets every viewer show it."""
    return {"type": "status", "data": {"session_id": event["session_id"], "message_id": event["message_id"],
                                       "seq": event["seq"], "reply_to": event["reply_to"],
                                       "status": event["status"], "timestamp": timestamp_from_epoch(event["at"])}}


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
