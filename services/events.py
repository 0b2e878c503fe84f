"""Constructors of the bus's events (the list is in services/bus.py): plain dicts, built from plain values."""
import time


def _reply(reply, **fields):
    """`reply`: a live Generation or a frames.snapshot() of a stored message. `epoch`: the owner's fencing token
    (a viewer's log drops text of an older one: services/replylog.py)."""
    return {"session_id": reply.session_id, "message_id": reply.message_id, "seq": reply.seq,
            "reply_to": reply.reply_to, "epoch": reply.epoch, **fields}


def user_message(data, session_type="person", connection_id=""):
    """`data`: frames.message_data() of the stored user message; `connection_id`: the sending WebSocket's."""
    return {"type": "user_message", "session_id": data["session_id"], "message": data,
            "session_type": session_type, "connection_id": connection_id}


def regenerate(session_id, seq, message_id, reply_to, replaces):
    """A new reply (`message_id`, numbered `seq`) to an earlier user message (`reply_to`), replacing the reply
    `replaces` (services/chat.py regenerate). It accounts for its number in every viewer's order before the
    reply's own events; viewers get no frame of it (the reply's frames name `reply_to`)."""
    return {"type": "reply.regenerate", "session_id": session_id, "seq": seq, "message_id": message_id,
            "reply_to": reply_to, "replaces": replaces}


def handover(session_id, message_id):
    """A draining instance gave a live reply up (services/streams.py hand_over): the others' reapers take it over
    now rather than at their next sweep."""
    return {"type": "handover", "session_id": session_id, "message_id": message_id}


def reply_started(gen):
    """`bases`, when another instance took it over: where each owner took it up (services/replylog.py)."""
    event = {"type": "reply.started", **_reply(gen, status=gen.status, stream=gen.stream)}
    if gen.bases:
        event["bases"] = gen.bases
    return event


def reply_delta(gen, *, offset, text, thinking_offset, thinking):
    # once per chunk: one dict, built at once (the same keys as _reply's)
    return {"type": "reply.delta", "session_id": gen.session_id, "message_id": gen.message_id, "seq": gen.seq,
            "reply_to": gen.reply_to, "epoch": gen.epoch, "offset": offset, "text": text,
            "thinking_offset": thinking_offset, "thinking": thinking}


def reply_sync(gen):
    """The whole text of a live reply so far, from offset 0, for an instance that lacks some of it (a cluster
    bus answers a new viewer elsewhere with it); `started_at`: its viewers there since then read it from 0."""
    return {**reply_delta(gen, offset=0, text=gen.content, thinking_offset=0, thinking=gen.thinking),
            "sync": True, "started_at": gen.started_epoch, "bases": gen.bases}


def reply_final(reply):
    """`continuations`: how many times another instance went on with it (its final frame says so)."""
    return {"type": "reply.final", **_reply(reply, status=reply.status, content=reply.content,
                                            thinking=reply.thinking, error=reply.error, usage=reply.usage,
                                            continuations=getattr(reply, "continuations", 0))}


def reply_stored(doc):
    """A stored assistant message as read from the store (the truth, when events may have been lost): the
    reply's logs apply it like the owner's events (services/replylog.py). Never published: delivered locally."""
    created = doc.get("created_at")
    return {"type": "reply.stored", "session_id": doc["session_id"], "message_id": doc["_id"], "seq": doc["seq"],
            "reply_to": doc.get("reply_to"), "epoch": doc.get("epoch") or 0, "status": doc["status"],
            "content": doc.get("content") or "", "thinking": doc.get("thinking") or "", "error": doc.get("error"),
            "usage": doc.get("usage"), "stream": doc.get("stream", True),
            "continuations": doc.get("continuations") or 0,
            "bases": [[c["epoch"], c.get("offset", 0), c.get("thinking_offset", 0)] for c in doc.get("continued") or ()],
            "started_at": created.timestamp() if hasattr(created, "timestamp") else 0.0,
            "origin": "store", "at": time.time()}


def stop(session_id, message_id=None):
    return {"type": "stop", "session_id": session_id, "message_id": message_id}


def reset(session_id, deleted):
    return {"type": "reset", "session_id": session_id, "deleted": deleted}


def members(session_id, added, removed, members, by, reason="removed"):
    """`members`: the whole list after the change (as stored), `by`: who changed it; `reason`: what the removed
    members' viewing connections are told (`removed`, or `left_group`)."""
    return {"type": "members", "session_id": session_id, "added": list(added), "removed": list(removed),
            "members": list(members), "by": by, "reason": reason}


def presence(session_id, event, user_id):
    return {"type": "presence", "session_id": session_id, "event": event, "user_id": user_id}


def broadcast(message, pipeline=None):
    return {"type": "broadcast", "pipeline": pipeline, "message": message}


def push(user_id, message, data=None):
    return {"type": "push", "user_id": user_id, "message": message, "data": data}


def reconnect(reason="shutdown", retry_after=None):
    return {"type": "reconnect", "reason": reason, "retry_after": retry_after}
