"""The bus's events (services/delivery/bus.py): one Struct per type, and the only place an event's shape is declared.

An event is data, never a closure or a live object (a Connection, a Generation): each crosses a process boundary
as `to_builtins(event)` (BSON, on the cluster bus) and comes back whole through `decode()`. `origin` (the
publishing instance) and `at` (epoch seconds: the frames' timestamp, and the bus lag elsewhere) are stamped by
`Bus.publish` unless set. The functions below build the events that derive from a live Generation or a stored
message; the others are made by their Struct's keywords.
"""
import time
from datetime import timezone
from typing import Any

import msgspec
from msgspec import Struct


class Event(Struct, tag_field="type", kw_only=True):
    origin: str | None = None
    at: float = 0.0


class UserMessage(Event, tag="user_message"):
    """`message`: frames.message_data() of the stored user message; `connection_id`: the sending WebSocket's."""
    session_id: str
    message: dict
    session_type: str = "person"
    connection_id: str = ""


class ReplyRegenerate(Event, tag="reply.regenerate"):
    """A new reply (`message_id`, numbered `seq`) to an earlier user message (`reply_to`), replacing the reply
    `replaces` (services/conversations/sending.py regenerate). It accounts for its number in every viewer's order before
    the reply's own events; viewers get no frame of it (the reply's frames name `reply_to`)."""
    session_id: str
    seq: int
    message_id: str
    reply_to: str
    replaces: str


class Reply(Event, kw_only=True):
    """What every event of one reply carries. `epoch`: its owner's fencing token (a viewer's log drops text of an
    older one: services/delivery/replylog.py); `bases`: [epoch, offset, thinking_offset] where each owner that took it
    over from another instance took it up."""
    session_id: str
    message_id: str
    seq: int
    reply_to: str | None
    epoch: int = 0
    bases: list = []


class ReplyStarted(Reply, tag="reply.started"):
    """`started_at`: when the reply first started (a continuation's: when it was sent): viewers connected since
    may hold some of it from another instance, and read it only from where their `resume` says."""
    status: str
    stream: bool = True
    started_at: float = 0.0


class ReplyDelta(Reply, tag="reply.delta", gc=False):
    """Once per chunk. A `sync` is the whole text so far, from offset 0, for an instance that lacks some of it (a
    cluster bus answers a new viewer elsewhere with it); `started_at`: its viewers there since then read it
    from 0."""
    offset: int
    text: str
    thinking_offset: int
    thinking: str
    sync: bool = False
    started_at: float = 0.0


class ReplyFinal(Reply, tag="reply.final"):
    """`continuations`: how many times another instance went on with it (its final frame says so)."""
    status: str
    content: str = ""
    thinking: str = ""
    error: dict | None = None
    usage: dict | None = None
    continuations: int = 0


class ReplyStored(ReplyFinal, tag="reply.stored"):
    """A stored assistant message as read from the store (the truth, when events may have been lost): the
    reply's logs apply it like the owner's events (services/delivery/replylog.py). Never published:
    delivered locally."""
    stream: bool = True
    started_at: float = 0.0


class Handover(Event, tag="handover"):
    """A draining instance gave a live reply up (services/replies/streams.py hand_over): the others' reapers take it
    over now rather than at their next sweep."""
    session_id: str
    message_id: str


class Stop(Event, tag="stop"):
    """`message_id` None: every reply of the session."""
    session_id: str
    message_id: str | None = None


class Reset(Event, tag="reset"):
    session_id: str
    deleted: int


class Members(Event, tag="members"):
    """`members`: the whole list after the change (as stored), `by`: who changed it; `reason`: what the removed
    members' viewing connections are told (`removed`, or `left_group`)."""
    session_id: str
    added: list[str]
    removed: list[str]
    members: list[str]
    by: str | None
    reason: str = "removed"


class Presence(Event, tag="presence"):
    session_id: str
    event: str  # join | leave
    user_id: str


class Broadcast(Event, tag="broadcast"):
    """`pipeline` None: every pipeline's connections."""
    message: str
    pipeline: str | None = None


class Push(Event, tag="push"):
    user_id: str
    message: Any
    data: Any = None


class Reconnect(Event, tag="reconnect"):
    """For the publishing instance's own connections only: it is draining."""
    reason: str = "shutdown"
    retry_after: float | None = None


class Interest(Event, tag="interest"):
    """The cluster bus's own (services/cluster/mongo_bus.py): the sessions an instance views, so owners send it their
    replies' deltas; `sync`: answer with the whole text so far; `online`: the users viewing each group session
    there (presence)."""
    sessions: list[str]
    sync: bool = False
    online: dict[str, list[str]] = {}


class Probe(Event, tag="probe"):
    """The cluster bus's own: written after a reopen, it must come back through the stream
    (services/cluster/mongo_bus.py)."""
    id: str


class CatchUp(Event, tag="catch_up"):
    """A cluster bus to its own subscribers, never published: events may have been lost, after a reopened change
    stream (`resync`) or as a periodic check, so the fan-out compares the sessions' stored message numbers with
    what it delivered (services/delivery/ordering.py) and re-reads the replies it follows
    (services/delivery/replylog.py)."""
    resync: bool = False


EVENTS = (UserMessage, ReplyRegenerate, ReplyStarted, ReplyDelta, ReplyFinal, ReplyStored, Handover, Stop, Reset,
          Members, Presence, Broadcast, Push, Reconnect, Interest, Probe, CatchUp)
LOCAL = frozenset((ReplyStored, CatchUp))  # delivered to this instance's subscribers only
for _kind in EVENTS:
    _kind.type = _kind.__struct_config__.tag  # event.type, as on the wire
TYPES = tuple(kind.type for kind in EVENTS)
CROSSING = tuple(kind.type for kind in EVENTS if kind not in LOCAL)  # what a cluster bus may carry
AnyEvent = UserMessage | ReplyRegenerate | ReplyStarted | ReplyDelta | ReplyFinal | ReplyStored | Handover | Stop \
    | Reset | Members | Presence | Broadcast | Push | Reconnect | Interest | Probe | CatchUp


def decode(data):
    """An event as another instance wrote it (plain data). Raises msgspec.ValidationError naming the bad path."""
    return msgspec.convert(data, AnyEvent)


to_builtins = msgspec.to_builtins


# events of a live Generation (services/replies/streams.py) or of a stored message

def reply_started(gen):
    return ReplyStarted(session_id=gen.session_id, message_id=gen.message_id, seq=gen.seq, reply_to=gen.reply_to,
                        epoch=gen.epoch, bases=gen.bases, status=gen.status, stream=gen.stream,
                        started_at=gen.started_epoch)


def reply_delta(gen, offset, text, thinking_offset, thinking):
    return ReplyDelta(session_id=gen.session_id, message_id=gen.message_id, seq=gen.seq, reply_to=gen.reply_to,
                      epoch=gen.epoch, offset=offset, text=text, thinking_offset=thinking_offset, thinking=thinking)


def reply_sync(gen):
    return ReplyDelta(session_id=gen.session_id, message_id=gen.message_id, seq=gen.seq, reply_to=gen.reply_to,
                      epoch=gen.epoch, bases=gen.bases, offset=0, text=gen.content, thinking_offset=0,
                      thinking=gen.thinking, sync=True, started_at=gen.started_epoch)


def reply_final(reply):
    """`reply`: a Generation, or a frames.snapshot() of a stored message."""
    return ReplyFinal(session_id=reply.session_id, message_id=reply.message_id, seq=reply.seq,
                      reply_to=reply.reply_to, epoch=reply.epoch, status=reply.status, content=reply.content,
                      thinking=reply.thinking, error=reply.error, usage=reply.usage,
                      continuations=getattr(reply, "continuations", 0))


def epoch_seconds(when):
    """A stored datetime as epoch seconds, 0.0 if absent (the driver returns naive datetimes, in UTC)."""
    if not hasattr(when, "timestamp"):
        return 0.0
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def reply_stored(doc):
    """A stored assistant message (store.assemble()d: its text whole)."""
    return ReplyStored(
        session_id=doc["session_id"], message_id=doc["_id"], seq=doc["seq"], reply_to=doc.get("reply_to"),
        epoch=doc.get("epoch") or 0, status=doc["status"], content=doc.get("content") or "",
        thinking=doc.get("thinking") or "", error=doc.get("error"), usage=doc.get("usage"),
        stream=doc.get("stream", True), continuations=doc.get("continuations") or 0,
        bases=[[c["epoch"], c.get("offset", 0), c.get("thinking_offset", 0)] for c in doc.get("continued") or ()],
        started_at=epoch_seconds(doc.get("created_at")), origin="store", at=time.time())


def reply_live(gen):
    """A reply live here and not read from the store: as far as the store would know it (nothing, while queued;
    the log has its text once it streams)."""
    return ReplyStored(session_id=gen.session_id, message_id=gen.message_id, seq=gen.seq, reply_to=gen.reply_to,
                       epoch=gen.epoch, status=gen.status, stream=gen.stream, started_at=gen.started_epoch)
