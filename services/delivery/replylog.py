"""A reply is an offset-addressed log, read by one reader per viewer: the one home of recovery.

Everything a viewer is sent of a reply — the live stream, the catch-up after a `resume`, a reply followed from
another instance, a re-read of the store after events were lost — is its reader moving along the reply's log.
Every source feeds the same log (this instance's generation, another instance's deltas on the bus, a stored
message read from MongoDB), and the log applies each by its offsets and its epoch (the owner's fencing token):
text it has is dropped; a gap is refused and the owner asked for the whole text; text of an older epoch (a
fenced owner still talking) is dropped; text of a newer epoch (a new owner, continuing from its checkpoint)
replaces what came after that checkpoint.

The end is the store's terminal state — the owner's after its terminal write landed, the reaper's, or a read —
and it closes the log for good (`ended`): no later event (a duplicate, a fenced owner's stale final, a reaper's,
a store read) can reach a viewer again. A reader that delivered the final is closed (the connection remembers
it, for a `resume` crossing it). A reader that was sent text the stored state does not hold (written after the
last checkpoint of an owner that died or was fenced) is told so before anything else: a `rewind` frame back to
where the stored text ends (Parley's dialect; a LangBot client's cumulative frames simply carry the text).

Each distinct frame is rendered and encoded once (`send(frame, conns)`): readers are grouped by what they need
(dialect, stream mode, position).

Longer than the house's other rooms on purpose: every decision about what a viewer has of a reply lives here and
nowhere else (before, four modules each decided part of it, and their interleavings lost text or sent a second
final). tests/test_replylog.py proves it by interleaving.
"""
import asyncio
import itertools
import logging
import math
import time
from collections import OrderedDict

from services.storage.store import assemble
from services.wire import events, frames
from services.wire.codes import LIVE, Code, ReplyStatus, RewindReason
from services.wire.errors import BadRequest

log = logging.getLogger(__name__)

CUMULATIVE_INTERVAL = 0.1  # seconds: at most ten frames a second of one reply to cumulative (LangBot) viewers
PAGE = 48 * 1024  # code points per frame of a delta-mode catch-up: ≤ 4 bytes each, so ≤ 256 KB with escapes
FINALS_REMEMBERED = 32  # per connection: a resume crossing a final in flight must not get it a second time
ENDED_REMEMBERED = 8192  # per instance: replies whose end was delivered (a late event for one is dropped)
QUIET = 1.0  # seconds a followed reply may stay silent before its owner is asked again and the store read
# Statuses whose stored text is everything that was streamed: an offset beyond it is a client error.
COMPLETE_TEXT = (ReplyStatus.COMPLETED, ReplyStatus.STOPPED, ReplyStatus.FAILED, ReplyStatus.TIMEOUT)


class Text:
    """Text that grows by appends and is read mostly from its end: pieces are joined only when all is needed."""
    __slots__ = ("parts", "length")

    def __init__(self, text=""):
        self.parts = [text] if text else []
        self.length = len(text)

    def append(self, text):
        if text:
            self.parts.append(text)
            self.length += len(text)

    def after(self, offset):
        need = self.length - offset
        if need <= 0:
            return ""
        last = self.parts[-1]
        if len(last) >= need:  # the usual case: what a viewer lacks is within the latest piece
            return last if len(last) == need else last[len(last) - need:]
        picked, got = [], 0
        for part in reversed(self.parts):
            picked.append(part)
            got += len(part)
            if got >= need:
                break
        text = "".join(reversed(picked)) if len(picked) > 1 else picked[0]
        return text[len(text) - need:] if len(text) > need else text

    def truncate(self, length):
        if length < self.length:
            whole = str(self)[:length]
            self.parts = [whole] if whole else []
            self.length = length

    def __str__(self):
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class Reader:
    """Where one connection is in one reply: the next answer and reasoning offsets it will be sent."""
    __slots__ = ("session_id", "offset", "thinking_offset")

    def __init__(self, session_id, offset=0, thinking_offset=0):
        self.session_id = session_id
        self.offset = offset
        self.thinking_offset = thinking_offset


class Log:
    """One reply as this instance knows it: its ids, its owner's epoch and its text so far."""
    __slots__ = ("session_id", "message_id", "seq", "reply_to", "status", "stream", "epoch", "bases", "announced",
                 "text", "thinking_text", "error", "usage", "local", "started_at", "at", "heard", "cumulative_due",
                 "timer")

    def __init__(self, reply, *, local, started_at, status=ReplyStatus.STREAMING, stream=True, content="",
                 thinking=""):
        """`reply`: the reply's first event here (services/wire/events.py's Reply), or its stored state."""
        self.session_id = reply.session_id
        self.message_id = reply.message_id
        self.seq = reply.seq
        self.reply_to = reply.reply_to
        self.status = status
        self.stream = stream
        self.epoch = reply.epoch
        # [epoch, offset, thinking_offset]: where each owner that continued the reply took it up (text of an
        # older epoch past that point is void): a client resuming with text of an older epoch is trusted up to it
        self.bases = [list(b) for b in reply.bases]
        self.announced = None            # the epoch whose start its viewers were told of (a `status` frame)
        self.text = Text(content)
        self.thinking_text = Text(thinking)
        self.local = local               # generated on this instance (its text comes from here, never a gap)
        self.started_at = started_at     # epoch seconds: viewers connected after it may have some of it already
        self.at = reply.at               # epoch seconds of the latest text: the timestamp of its frames
        self.heard = time.monotonic()    # when its owner was last heard of (a followed reply gone quiet)
        self.cumulative_due = 0.0        # monotonic time before which cumulative viewers are not sent a frame
        self.timer = None                # the call that sends them what was held back meanwhile

    @property
    def content(self):
        return str(self.text)

    @property
    def thinking(self):
        return str(self.thinking_text)


def agreed(shown, stored, same_epoch):
    """How much of the text a viewer was shown (`shown`) the stored text confirms. One owner's text only ever
    grows, so within an epoch one is a prefix of the other; across epochs they agree up to their first
    difference."""
    if same_epoch:
        return min(len(shown), len(stored))
    n = min(len(shown), len(stored))
    if shown[:n] == stored[:n]:
        return n
    lo, hi = 0, n  # the first difference, by halves (C-speed slices; this runs once per failover)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shown[:mid] == stored[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ReplyLogs:
    """The replies this instance delivers, and every connection's reader of them.

    `send(frame, conns)` encodes a frame once and writes it to many connections; `want(session_id)` asks the
    owners of a session's live replies for their whole text (a cluster bus; nothing on a single box); `store`
    is read when followed replies may have lost events."""

    def __init__(self, hub, send, *, instance_id, session_type, store=None, want=None, metrics=None):
        self.hub = hub
        self.send = send
        self.instance_id = instance_id
        self.session_type = session_type
        self.store = store
        self.want = want or (lambda session_id: None)
        self.metrics = metrics
        self.logs = {}              # message_id -> Log: live replies
        self.ended = OrderedDict()  # message_id -> None: replies whose end was delivered here (the latest many)
        self._reading = None        # the task re-reading followed replies from the store

    # events: each is applied to its log (state), then delivered to the readers (frames)

    def started(self, event):
        log_ = self._log(event, event.started_at or event.at, event.status, event.stream)
        if log_ is None:
            return
        epoch = event.epoch
        if epoch < log_.epoch:
            return  # an older owner's start, late: the log follows a newer one
        log_.status, log_.stream = event.status, event.stream
        if epoch > log_.epoch:  # a new owner, continuing from where it took the reply up
            self._new_epoch(log_, epoch, event.bases)
        self._announce(log_, event.at)

    def delta(self, event):
        message_id = event.message_id
        log_ = self.logs.get(message_id)
        if log_ is None:
            if message_id in self.ended:
                return
            if event.offset or event.thinking_offset:
                self.want(event.session_id)  # we came in mid-reply: its owner sends it from the start
                return
            log_ = self._log(event, event.started_at or event.at)
            if log_ is None:
                return
        log_.heard = time.monotonic()
        offset, thinking_offset, epoch = event.offset, event.thinking_offset, event.epoch
        if epoch < log_.epoch:
            return  # a fenced owner's text: the store holds the newer owner's
        if epoch > log_.epoch:  # a new owner: its text replaces what came after its starting point
            if not event.bases and (log_.text.length or log_.thinking_text.length):
                self.want(log_.session_id)  # (where that is, its start or its whole text says: ask for them)
                return
            self._new_epoch(log_, epoch, event.bases)
        have, thinking_have = log_.text.length, log_.thinking_text.length
        if offset > have or thinking_offset > thinking_have:
            log.info("reply.delta with a gap message_id=%s offset=%s have=%s: asking for the whole text",
                     message_id, offset, have)
            self.want(log_.session_id)
            return
        # what the log already has (a repeat, or an overlap) is dropped: the offsets say how much
        text, thinking = event.text[have - offset:], event.thinking[thinking_have - thinking_offset:]
        if not (text or thinking):
            return
        log_.text.append(text)
        log_.thinking_text.append(thinking)
        log_.at = event.at
        if log_.stream:
            self._pump(log_)

    def final(self, ended, besides=None):
        """The end of a reply (a reply.final event, or a stored message found terminal: events.ReplyStored). The
        first one closes the log; any later one is dropped. `besides`: a connection that was given it already (a
        resume)."""
        message_id = ended.message_id
        if message_id in self.ended:
            return
        log_ = self.logs.get(message_id)
        if log_ is not None and log_.timer is not None:
            self._flush_cumulative(message_id)  # what cumulative viewers were held back from: before the final
        self._close(message_id)
        session_type = self.session_type(ended.session_id)
        timestamp = frames.timestamp_from_epoch(ended.at or time.time())
        # when the owner ended it (the bus's stamp; a final read from the store has none): a connection made
        # after that, with no reader, is a client back from elsewhere that may hold this final already (seen in
        # rolling restarts: a second final on the new socket when the event got here after it); it has asked for
        # what it lacks (resume) or will (history)
        ended_at = ended.at if ended.origin != "store" else None
        conns = []
        for conn in self.hub.viewers(ended.session_id):
            if message_id in conn.finals_sent or conn is besides:
                continue
            reader = conn.readers.pop(message_id, None)
            if reader is None and ended_at is not None and conn.created_at > ended_at:
                continue
            if reader is not None and (log_ is None or log_.stream):
                self._settle(conn, reader, log_, ended, timestamp, session_type)
            self._closed(conn, message_id)
            conns.append(conn)
        by_dialect = {}
        for conn in conns:
            by_dialect.setdefault(conn.dialect, []).append(conn)
        for dialect, group in by_dialect.items():
            self.send(frames.final(ended, timestamp=timestamp, dialect=dialect, session_type=session_type), group)

    def stored(self, doc):
        """A stored assistant message read from the store (a `reply.stored` event, or a resume's read): the
        source of truth. One that ended ends the log; of a live one, the text past what the log has goes out."""
        state = stored_state(doc)
        if state.status not in LIVE:
            self.final(state)
            return
        grew = self._merge(state)
        if grew is not None and grew.stream:
            self._pump(grew)

    def _merge(self, state, local=False):
        """Apply a live stored state to its log. Returns the log if readers may have something new, else None."""
        message_id = state.message_id
        if message_id in self.ended:
            return None
        log_ = self.logs.get(message_id)
        if log_ is None:
            self.logs[message_id] = log_ = Log(state, local=local, started_at=state.started_at,
                                               status=state.status, stream=state.stream, content=state.content,
                                               thinking=state.thinking)
            self._present(log_)
            return log_
        if state.epoch < log_.epoch:
            return None  # read before the newer owner claimed it: the log knows better
        if state.epoch > log_.epoch:  # a newer owner: the log is right up to where the first one took over
            self._new_epoch(log_, state.epoch, state.bases, _common(log_, state))
        if log_.status == ReplyStatus.QUEUED and state.status == ReplyStatus.STREAMING:
            log_.status = ReplyStatus.STREAMING
        text, thinking = state.content[log_.text.length:], state.thinking[log_.thinking_text.length:]
        if not (text or thinking):
            return None
        log_.text.append(text)
        log_.thinking_text.append(thinking)
        log_.at = time.time()
        return log_

    # delivery

    def _pump(self, log_, only_cumulative=False):
        """Send each reader the reply's text after its position, one encoding per distinct frame. Cumulative
        readers get at most one frame per CUMULATIVE_INTERVAL (each carries the whole text: sent per token,
        a reply's bytes would grow with its square); the text of the ones held back follows in the next."""
        message_id = log_.message_id
        # the clock only when a cumulative viewer is being paced (a delta-only reply never reads it)
        now = time.monotonic() if log_.cumulative_due else 0.0
        hold = log_.cumulative_due > now
        held = cumulative = False
        groups = {}
        length, thinking_length = log_.text.length, log_.thinking_text.length
        for conn in self.hub.viewers(log_.session_id):
            if conn.stream_mode == "cumulative":
                if hold:
                    held = True
                    continue
            elif only_cumulative:
                continue
            reader = conn.readers.get(message_id)
            if reader is None:
                # A delta-mode connection that began viewing after the reply started waits for its `resume` (it
                # may have some of it from elsewhere); a cumulative frame is self-contained, so it just follows.
                if conn.stream_mode == "delta" or message_id in conn.finals_sent:
                    continue
                reader = conn.readers[message_id] = Reader(log_.session_id)
            offset, thinking_offset = reader.offset, reader.thinking_offset
            if offset >= length and thinking_offset >= thinking_length:
                continue  # it already has this much (it resumed from another instance, ahead of us)
            cumulative = cumulative or conn.stream_mode == "cumulative"
            key = (conn.dialect, conn.stream_mode, offset, thinking_offset)
            group = groups.get(key)
            if group is None:
                groups[key] = [conn]
            else:
                group.append(conn)
            if offset < length:
                reader.offset = length
            if thinking_offset < thinking_length:
                reader.thinking_offset = thinking_length
        if cumulative:
            log_.cumulative_due = time.monotonic() + CUMULATIVE_INTERVAL
        elif held and log_.timer is None:
            log_.timer = asyncio.get_running_loop().call_later(log_.cumulative_due - now,
                                                               self._flush_cumulative, message_id)
        if not groups:
            return
        timestamp = frames.timestamp_from_epoch(log_.at)
        session_type = None
        for (dialect, mode, start, thinking_start), conns in groups.items():
            text, thinking = log_.text.after(start), log_.thinking_text.after(thinking_start)
            if mode == "delta" and dialect == frames.PARLEY:
                # a busy socket with this reply's chunk still waiting takes the new text into it: no frame made
                conns = [c for c in conns
                         if not c.outbox.extend(message_id, start, text, thinking_start, thinking, timestamp)]
                if not conns:
                    continue
            if session_type is None:
                session_type = self.session_type(log_.session_id)
            self.send(frames.chunk(log_, mode, offset=start, text=text, thinking_offset=thinking_start,
                                   thinking=thinking, timestamp=timestamp, dialect=dialect,
                                   session_type=session_type), conns)

    def _flush_cumulative(self, message_id):
        """The text held back from cumulative viewers, once their interval has passed (or before the final)."""
        log_ = self.logs.get(message_id)
        if log_ is None:
            return
        if log_.timer is not None:
            log_.timer.cancel()
            log_.timer = None
        log_.cumulative_due = 0.0
        self._pump(log_, only_cumulative=True)

    def _new_epoch(self, log_, epoch, bases, agreed_at=None):
        """A newer owner (`epoch`) generates the reply. Each owner that took it over since the log's continued from
        a stored point (`bases`: [epoch, offset, thinking_offset], from the store's `continued`); the log's text
        past the first such point is void. Every viewer is told (a `rewind` naming the new epoch and where the
        reply continues: one that holds more drops it; a client that resumes later says whose text it holds),
        readers past it are taken back. Without the points (`agreed_at`: where the stored text departs)."""
        if agreed_at is None and not any(b[0] > log_.epoch for b in bases or ()):
            log_.epoch = epoch  # its first owner (it was queued): nothing was void
            return
        # Where the void begins: the first new owner's stored point. Not capped at what this log holds: a reader
        # ahead of it (a client that followed the reply elsewhere) keeps the text before that point (a rewind to
        # the log's end would take it back, and the text would come again).
        offset, thinking_offset = agreed_at or (math.inf, math.inf)
        for base_epoch, base, thinking_base in bases or ():
            if base_epoch > log_.epoch:
                offset, thinking_offset = min(offset, base), min(thinking_offset, thinking_base)
            if not any(b[0] == base_epoch for b in log_.bases):
                log_.bases.append([base_epoch, base, thinking_base])
        if agreed_at:  # where the stored text departs from this log's: known no further than the log
            offset, thinking_offset = min(offset, log_.text.length), min(thinking_offset, log_.thinking_text.length)
        if self.metrics is not None:
            self.metrics.rewound.inc(max(0, log_.text.length - offset) + max(0, log_.thinking_text.length
                                                                              - thinking_offset))
        log_.epoch = log_.announced = epoch
        log_.text.truncate(offset)
        log_.thinking_text.truncate(thinking_offset)
        readers = []  # (a viewer without one holds nothing from this log: it says what it holds when it resumes)
        for conn in self.hub.viewers(log_.session_id):
            if (reader := conn.readers.get(log_.message_id)) is not None:
                reader.offset = min(reader.offset, offset)
                reader.thinking_offset = min(reader.thinking_offset, thinking_offset)
                readers.append(conn)
        self.send(frames.rewind(log_, offset=offset, thinking_offset=thinking_offset,
                                reason=RewindReason.INSTANCE_LOST), readers)

    def _announce(self, log_, at=None):
        """Tell the viewers once per owner that the reply streams (queued -> streaming)."""
        if log_.announced == log_.epoch or log_.status != ReplyStatus.STREAMING:
            return
        log_.announced = log_.epoch
        self.send(frames.status(log_, at or time.time()), self.hub.viewers(log_.session_id))

    def _settle(self, conn, reader, log_, ended, timestamp, session_type):
        """Before a reader's final: text it was shown that the final does not hold is taken back (rewind), and
        the final's text it was not shown yet follows, so its frames still add up to the final."""
        if log_ is not None:
            same = ended.epoch == log_.epoch
            offset = min(reader.offset, agreed(log_.content, ended.content, same))
            thinking_offset = min(reader.thinking_offset, agreed(log_.thinking, ended.thinking, same))
        else:  # a reader that resumed ahead of what reached us: the stored text is all there is
            offset = min(reader.offset, len(ended.content))
            thinking_offset = min(reader.thinking_offset, len(ended.thinking))
        if offset < reader.offset or thinking_offset < reader.thinking_offset:
            if conn.dialect == frames.PARLEY:
                reason = (RewindReason.INSTANCE_LOST if ended.status == ReplyStatus.INTERRUPTED
                          else RewindReason.FENCED)
                self.send(frames.rewind(ended, offset=offset, thinking_offset=thinking_offset, reason=reason),
                          [conn])
            reader.offset, reader.thinking_offset = offset, thinking_offset
        self._send_after(conn, reader, ended, ended.content, ended.thinking, timestamp, session_type)

    # readers

    def _log(self, event, started_at, status=ReplyStatus.STREAMING, stream=True):
        """The live log of the reply an event is about, made on its first event (None: it ended already)."""
        message_id = event.message_id
        log_ = self.logs.get(message_id)
        if log_ is None and message_id not in self.ended:
            local = event.origin == self.instance_id
            if not local and not self.hub.by_session.get(event.session_id):
                return None  # generating elsewhere, viewed by no one here (a resume reads it from the store)
            log_ = self.logs[message_id] = Log(event, local=local, started_at=started_at, status=status,
                                               stream=stream)
            self._present(log_)
        return log_

    def _present(self, log_):
        """The viewers who were here when the reply started read it from its start. One that connected since
        may have some of it already (it moved here mid-reply): it resumes from what it has."""
        for conn in self.hub.viewers(log_.session_id):
            if conn.created_at <= log_.started_at and log_.message_id not in conn.finals_sent:
                conn.readers.setdefault(log_.message_id, Reader(log_.session_id))

    def _close(self, message_id):
        log_ = self.logs.pop(message_id, None)
        if log_ is not None and log_.timer is not None:
            log_.timer.cancel()
        self.ended[message_id] = None
        if len(self.ended) > ENDED_REMEMBERED:
            self.ended.popitem(last=False)

    @staticmethod
    def _closed(conn, message_id):
        conn.finals_sent[message_id] = None
        if len(conn.finals_sent) > FINALS_REMEMBERED:
            del conn.finals_sent[next(iter(conn.finals_sent))]

    def forget(self, message_id):
        """A reply that is no more (its session was reset): its log closes with nothing more to say; viewers were
        told by the reset itself."""
        log_ = self.logs.get(message_id)
        if log_ is None:
            return
        self._close(message_id)
        for conn in self.hub.viewers(log_.session_id):
            conn.readers.pop(message_id, None)

    def reset(self, session_id):
        for message_id in [m for m, log_ in self.logs.items() if log_.session_id == session_id]:
            self.forget(message_id)

    def leave(self, conn, session_id):
        for message_id in [m for m, r in conn.readers.items() if r.session_id == session_id]:
            del conn.readers[message_id]

    # resume: a reader placed where the client says it is

    def resume(self, conn, session_id, docs, wanted, local=()):
        """Answer a `resume` (services/delivery/resume.py did the lookups): `docs` are the stored replies (and live
        local ones as stored_state()s), `wanted` {message_id: (offset, thinking_offset, epoch)} what the client has,
        `local` the ids generating here. Applies the stored states first (the store is the truth: other viewers get what
        they add too), then sends `resumed`, and places a reader for each reply at the client's position: it
        gets the text after it at once, then the final if the reply ended. Never awaits. Raises BadRequest for
        an offset beyond a text that cannot have been streamed. Returns [(reply, offset, thinking_offset,
        source)] as sent, source = live | store | finished | sent."""
        states = sorted((stored_state(d) for d in docs), key=lambda s: s.seq)
        plan, grown, ends = [], [], []
        try:
            self._plan(conn, states, wanted, local, plan, grown, ends)
        except Exception:
            self._spread(ends, grown)  # what the reads taught us still reaches the other viewers
            raise
        conn.send(frames.resumed(session_id, [(r, o, t) for r, o, t, _ in plan]))
        timestamp = frames.timestamp()
        session_type = self.session_type(session_id)
        for reply, offset, thinking_offset, source in plan:
            if source == "sent":
                continue
            reader = conn.readers[reply.message_id] = Reader(session_id, offset, thinking_offset)
            if source == "finished":  # (a later resume of it, asked for, gets it again: protocol.md)
                self._settle(conn, reader, None, reply, timestamp, session_type)
                del conn.readers[reply.message_id]
                self.send(frames.final(reply, timestamp=timestamp, dialect=conn.dialect,
                                       session_type=session_type), [conn])
            elif reply.stream or source != "live":
                self._catch_up(conn, reader, reply, timestamp, session_type)
        self._spread(ends, grown, conn)
        return plan

    def _spread(self, ends, grown, besides=None):
        for state in ends:  # what others here lacked: the store says these ended
            self.final(state, besides)
        for log_ in grown:
            if log_.stream:
                self._pump(log_)

    def _plan(self, conn, states, wanted, local, plan, grown, ends):
        """Apply each stored state and decide where each reader starts (no frame sent yet). A client that holds
        more than that (an older owner's text) is told by `resumed` itself: its offsets are where the connection
        continues, and what lies past them is void (docs/protocol.md)."""
        detached = {}
        try:
            for state in states:
                self._place(conn, state, wanted, local, plan, grown, ends, detached)
        except Exception:
            conn.readers.update(detached)  # as they were: the resume failed, the live stream goes on
            raise

    def _place(self, conn, state, wanted, local, plan, grown, ends, detached):
        message_id = state.message_id
        if message_id in self.ended and state.status in LIVE:
            raise Stale(message_id)  # read before it ended: the caller reads it again
        offset, thinking_offset, epoch = wanted.get(message_id, (0, 0, None))
        # The client's offsets win (a gap it saw is filled); `resumed` tells it where it continues. A reader this
        # connection had is placed anew below: meanwhile nothing here (the stored state applied) moves it.
        if (reader := conn.readers.pop(message_id, None)) is not None:
            detached[message_id] = reader
        if message_id in conn.finals_sent:
            reply, source = state, "sent"
        elif message_id in self.ended:
            reply, source = state, "finished"
        elif state.status not in LIVE:
            reply, source = state, "finished"
            ends.append(state)
        else:
            grew = self._merge(state, local=message_id in local)
            if grew is not None:
                grown.append(grew)
            reply = self.logs[message_id]
            source = "live" if message_id in local else "store"
        # text of an older owner than one that continued the reply is trusted only up to where that one took it
        # up (a client that does not say its epoch: up to the first such point)
        for base_epoch, base, thinking_base in reply.bases:
            if epoch is None or base_epoch > epoch:
                offset, thinking_offset = min(offset, base), min(thinking_offset, thinking_base)
        length, thinking_length = len(reply.content), len(reply.thinking)
        if offset > length or thinking_offset > thinking_length:
            if source == "store":
                pass  # generating on another instance: a client that followed it there may be ahead of us
            elif source == "live" or reply.status in COMPLETE_TEXT:
                raise BadRequest(f"offset beyond the {length} characters of reply {message_id!r}",
                                 code=Code.INVALID_OFFSET, message_id=message_id)
            # else interrupted: text after its last checkpoint was lost; the reader is taken back to it
        plan.append((reply, offset, thinking_offset, source))

    def _catch_up(self, conn, reader, log_, timestamp, session_type):
        """The text of a live reply after a reader's position, at once (nothing when the reader is ahead: a
        client that followed it on another instance; the live text catches up with it)."""
        if reader.offset < log_.text.length or reader.thinking_offset < log_.thinking_text.length:
            self._send_after(conn, reader, log_, log_.content, log_.thinking, timestamp, session_type)

    def _send_after(self, conn, reader, reply, content, thinking, timestamp, session_type):
        """The text after a reader's position as one frame, or in pages when a delta-mode catch-up is huge."""
        offset, thinking_offset = reader.offset, reader.thinking_offset
        reader.offset, reader.thinking_offset = max(offset, len(content)), max(thinking_offset, len(thinking))
        variant = {"dialect": conn.dialect, "session_type": session_type}
        if (conn.stream_mode == "delta" and conn.dialect != frames.LANGBOT
                and len(content) - offset + len(thinking) - thinking_offset > PAGE):
            conn.send_pages(reply.message_id, _pages(reply, content, offset, thinking, thinking_offset,
                                                     timestamp, variant))
            return
        self.send(frames.chunk(reply, conn.stream_mode, offset=offset, text=content[offset:],
                               thinking_offset=thinking_offset, thinking=thinking[thinking_offset:],
                               timestamp=timestamp, **variant), [conn])

    # followed replies (a cluster): events may be lost; the store and the owner fill in

    def check(self, *, reread_all=False):
        """Called every couple of seconds by a cluster bus (and at once after its change stream reopened,
        `reread_all`): every reply followed from another instance that has gone quiet for QUIET seconds (all of
        them after a reopen) is read from the store — one that ended gets its stored final; of a live one, the
        stored text past the log goes out — and its owner is asked for its whole text."""
        now = time.monotonic()
        quiet = [log_ for log_ in self.logs.values()
                 if not log_.local and (reread_all or now - log_.heard >= QUIET)]
        if self.metrics is not None:
            self.metrics.followed_replies.set(sum(1 for log_ in self.logs.values() if not log_.local))
        if not quiet or self.store is None or self._reading is not None:
            return
        for log_ in quiet:
            log_.heard = now
            self.want(log_.session_id)
        self._reading = asyncio.get_running_loop().create_task(
            self._reread([log_.message_id for log_ in quiet]), name="replies-reread")

    async def _reread(self, message_ids):
        try:
            docs = await self.store.find_messages(message_ids)
            for doc in docs:
                self.stored(doc)
            found = {doc["_id"] for doc in docs}
            for message_id in message_ids:
                if message_id not in found and message_id in self.logs:  # deleted (a reset): nothing to follow
                    self.forget(message_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store is away: the next check tries again
            log.warning("could not re-read %d followed replies: %s", len(message_ids), exc)
        finally:
            self._reading = None

    async def close(self):
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        for log_ in self.logs.values():
            if log_.timer is not None:
                log_.timer.cancel()


class Stale(Exception):
    """A resume read a reply as live that has ended since (services/delivery/resume.py reads it again)."""

    def __init__(self, message_id):
        super().__init__(message_id)
        self.message_id = message_id


def stored_state(doc):
    """A stored assistant message (a document read from the store, or a `reply.stored` event) as logs take it."""
    return doc if isinstance(doc, events.ReplyStored) else events.reply_stored(assemble(doc))


def _common(log_, state):
    return (agreed(log_.content, state.content, False), agreed(log_.thinking, state.thinking, False))


def _pages(reply, content, offset, thinking, thinking_offset, timestamp, variant):
    """A huge delta-mode catch-up as frames of at most PAGE code points, made as the client reads them: the
    reasoning first, then the answer, each page continuing exactly where the previous ended."""
    pages = itertools.chain(
        ((offset, "", at, thinking[at:at + PAGE]) for at in range(thinking_offset, len(thinking), PAGE)),
        ((at, content[at:at + PAGE], len(thinking), "") for at in range(offset, len(content), PAGE)))
    for text_at, text, thinking_at, thought in pages:
        yield frames.chunk(reply, "delta", offset=text_at, text=text, thinking_offset=thinking_at,
                           thinking=thought, timestamp=timestamp, **variant)
