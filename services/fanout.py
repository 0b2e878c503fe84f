"""The fan-out: one bus event -> frames for the local connections that should get it.

This is the only code that moves a connection's cursor (how much of each live reply it was sent) and the only
code that joins or leaves sessions (so cursors and presence stay consistent). Whether an event was born here or
on another instance, it reaches clients through `handle()`.

Each distinct frame is rendered and JSON-encoded once, and the same text is written to every connection that
gets those bytes: connections are grouped by what they need (dialect, stream mode, cursor position). Frames
carry the event's timestamp, never a per-connection one. LangBot's `data.connection_id` is the sender's on
`user_message` and "" on `response` (as LangBot's server sends them), so no frame has a per-connection field.
Extension frames (anything outside
schema.LangBotServerFrame) go only to connections that opted in to the Parley dialect.
"""
import asyncio
import itertools
import logging
import time

from services import events, frames
from services.codes import LIVE
from services.schema import LANGBOT_STRUCTS
from services.ordering import Ordering
from services.outbox import encode

log = logging.getLogger(__name__)

CUMULATIVE_INTERVAL = 0.1  # seconds: at most ten frames a second of one reply to cumulative (LangBot) viewers
PAGE = 48 * 1024  # code points per frame of a delta-mode catch-up: ≤ 4 bytes each, so ≤ 256 KB with escapes
FINALS_REMEMBERED = 32  # per connection: a resume crossing a final in flight must not get it a second time


class Cursor:
    """Where a connection is in one reply: the next answer and thinking offsets it will be sent."""
    __slots__ = ("session_id", "offset", "thinking_offset")

    def __init__(self, session_id, offset=0, thinking_offset=0):
        self.session_id = session_id
        self.offset = offset
        self.thinking_offset = thinking_offset


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

    def __str__(self):
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class Reply:
    """A live reply as the fan-out knows it: its ids and the text delivered so far."""

    def __init__(self, event, content="", thinking=""):
        self.session_id = event["session_id"]
        self.message_id = event["message_id"]
        self.seq = event["seq"]
        self.reply_to = event.get("reply_to")
        self.status = event.get("status", "streaming")
        self.stream = event.get("stream", True)
        self.text = Text(content)
        self.thinking_text = Text(thinking)
        self.error = self.usage = None
        self.origin = event.get("origin")
        self.at = event.get("at", 0.0)   # epoch seconds of the latest text: the timestamp of its frames
        self.cumulative_due = 0.0        # monotonic time before which cumulative viewers are not sent a frame
        self.timer = None                # the call that sends them what was held back meanwhile
        self.late = set()  # connections that began viewing after this reply started elsewhere (they resume)

    @property
    def content(self):
        return str(self.text)

    @property
    def thinking(self):
        return str(self.thinking_text)


class Final:
    """A reply.final event, shaped for frames.final()."""

    def __init__(self, event):
        self.__dict__.update({k: event.get(k) for k in ("session_id", "message_id", "seq", "reply_to", "status",
                                                       "error", "usage")})
        self.content = event.get("content") or ""
        self.thinking = event.get("thinking") or ""


class FanOut:
    def __init__(self, hub, bus, metrics=None, store=None):
        self.hub = hub
        self.bus = bus
        self.metrics = metrics
        self.replies = {}   # message_id -> Reply: live replies whose deltas this instance delivers
        self.encodes = 0    # distinct frames encoded, and frames written with them (for bench/ and tests)
        self.writes = 0
        self.handlers = {"user_message": self._user_message, "reply.started": self._started,
                         "reply.delta": self._delta, "reply.final": self._final, "reset": self._reset,
                         "members": self._members, "presence": self._presence, "broadcast": self._broadcast,
                         "push": self._push, "reconnect": self._reconnect,
                         "catch_up": lambda event: self.order.catch_up(event.get("resync", False))}
        # a session's messages reach its viewers here in the store's order (services/ordering.py)
        self.order = Ordering(self._dispatch, store, self._session_type)
        bus.subscribe(self.handle)

    def handle(self, event):
        self.order.handle(event)

    def _dispatch(self, event):
        handler = self.handlers.get(event["type"])
        if handler is not None:
            handler(event)

    # sending: one encoding per distinct frame

    def _send(self, frame, conns):
        """Write one frame to many connections, encoded once. Returns how many took it."""
        if frame is not None and type(frame) not in LANGBOT_STRUCTS:
            conns = [c for c in conns if c.dialect != frames.LANGBOT]
        if frame is None or not conns:
            return 0
        self.encodes += 1
        if self.metrics is not None:
            self.metrics.frame_encoded()
        sent = 0
        text = encode(frame)
        nbytes = len(text)
        for conn in conns:
            sent += conn.send(frame, text, nbytes)
        self.writes += sent
        return sent

    def _per_dialect(self, render, conns):
        """Render once per dialect present among `conns` (render(dialect) -> frame) and send each its own."""
        by_dialect = {}
        for conn in conns:
            by_dialect.setdefault(conn.dialect, []).append(conn)
        return sum(self._send(render(dialect), group) for dialect, group in by_dialect.items())

    def _session_type(self, session_id):
        return self.hub.session_type(session_id) or "person"

    # events

    def _user_message(self, event):
        session_type = event.get("session_type") or self._session_type(event["session_id"])
        self._per_dialect(lambda dialect: frames.user_message(event["message"], dialect, session_type,
                                                              event.get("connection_id", "")),
                          self.hub.viewers(event["session_id"]))

    def _started(self, event):
        reply = self.replies.get(event["message_id"])
        if reply is None:
            self.replies[event["message_id"]] = self._new_reply(event)
        else:  # followed while queued (follow())
            reply.status, reply.stream = event["status"], event.get("stream", True)
        self._send(frames.status(event), self.hub.viewers(event["session_id"]))

    def follow(self, stored):
        """A live reply this instance has no text of (queued, or generating on another instance), resumed by a
        connection here: the fan-out takes the stored text so far (its checkpoint) as the start, so the reply's
        next deltas continue it at once (one overlapping it is trimmed, one leaving a gap waits for the owner's
        sync). Its `reply.final`, from whichever instance, ends it. Returns the reply as the fan-out knows it."""
        reply = self.replies.get(stored.message_id)
        if reply is None:
            event = {"session_id": stored.session_id, "message_id": stored.message_id, "seq": stored.seq,
                     "reply_to": stored.reply_to, "status": stored.status}
            reply = self.replies[stored.message_id] = Reply(event, stored.content, stored.thinking)
        return reply

    def _delta(self, event):
        message_id, offset, thinking_offset = event["message_id"], event["offset"], event["thinking_offset"]
        reply = self.replies.get(message_id)
        if reply is None:
            if offset or thinking_offset:
                return  # the start of this reply never reached us: its text comes from the store on resume
            reply = self.replies[message_id] = self._new_reply(event)
        have, thinking_have = reply.text.length, reply.thinking_text.length
        if offset > have or thinking_offset > thinking_have:
            log.warning("reply.delta with a gap message_id=%s offset=%s have=%s", message_id, offset, have)
            return  # the text in between comes from the store (resume) or the final
        # what we already have (a repeat, or an overlap) is dropped: the offsets say how much
        text, thinking = event["text"][have - offset:], event["thinking"][thinking_have - thinking_offset:]
        if not (text or thinking):
            return
        reply.text.append(text)
        reply.thinking_text.append(thinking)
        reply.at = event["at"]
        if not reply.stream:
            return
        self._deliver(reply, bool(have or thinking_have or event.get("sync")))

    def _deliver(self, reply, midway, only_cumulative=False):
        """Send each viewer the reply's text after its cursor, one encoding per distinct frame. Cumulative
        viewers get at most one frame per CUMULATIVE_INTERVAL (each carries the whole text: sent per token,
        a reply's bytes would grow with its square); the text of the ones held back follows in the next."""
        message_id = reply.message_id
        # the clock only when a cumulative viewer is being paced (a delta-only reply never reads it)
        now = time.monotonic() if reply.cumulative_due else 0.0
        hold = reply.cumulative_due > now
        held = cumulative = False
        groups = {}
        length, thinking_length = reply.text.length, reply.thinking_text.length
        for conn in self.hub.viewers(reply.session_id):
            if conn.stream_mode == "cumulative":
                if hold:
                    held = True
                    continue
            elif only_cumulative:
                continue
            cursor = conn.cursors.get(message_id)
            if cursor is None:
                # A delta-mode connection that started viewing mid-reply waits for its `resume`; a cumulative
                # frame is self-contained, so a cumulative one simply starts following.
                # (A cluster `sync` starts at 0 but is mid-reply too: the reply's text so far, for a newcomer.)
                if conn.stream_mode == "delta" and (midway or conn.id in reply.late):
                    continue
                cursor = conn.cursors[message_id] = Cursor(reply.session_id)
            offset, thinking_offset = cursor.offset, cursor.thinking_offset
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
                cursor.offset = length
            if thinking_offset < thinking_length:
                cursor.thinking_offset = thinking_length
        if cumulative:
            reply.cumulative_due = time.monotonic() + CUMULATIVE_INTERVAL
        elif held and reply.timer is None:
            reply.timer = asyncio.get_running_loop().call_later(reply.cumulative_due - now,
                                                                self._flush_cumulative, message_id)
        if not groups:
            return
        timestamp = frames.timestamp_from_epoch(reply.at)
        session_type = None
        for (dialect, mode, start, thinking_start), conns in groups.items():
            text, thinking = reply.text.after(start), reply.thinking_text.after(thinking_start)
            if mode == "delta" and dialect == frames.PARLEY:
                # a busy socket with this reply's chunk still waiting takes the new text into it: no frame made
                conns = [c for c in conns
                         if not c.outbox.extend(message_id, start, text, thinking_start, thinking, timestamp)]
                if not conns:
                    continue
            if session_type is None:
                session_type = self._session_type(reply.session_id)
            self._send(frames.chunk(reply, mode, offset=start, text=text, thinking_offset=thinking_start,
                                    thinking=thinking, timestamp=timestamp, dialect=dialect,
                                    session_type=session_type), conns)

    def _flush_cumulative(self, message_id):
        """The text held back from cumulative viewers, once their interval has passed (or before the final)."""
        reply = self.replies.get(message_id)
        if reply is None:
            return
        if reply.timer is not None:
            reply.timer.cancel()
            reply.timer = None
        reply.cumulative_due = 0.0
        self._deliver(reply, True, only_cumulative=True)

    def _new_reply(self, event):
        reply = Reply(event)
        if reply.origin != self.bus.instance_id:
            # Generated elsewhere, and we may hear of it late: a connection opened after it started (a client
            # that moved here mid-reply) may already have some of it, so it resumes rather than start at 0.
            started = event.get("at", 0)
            reply.late = {c.id for c in self.hub.viewers(reply.session_id) if c.created_at > started}
        return reply

    def _final(self, event):
        message_id = event["message_id"]
        reply = self.replies.get(message_id)
        if reply is not None and reply.timer is not None:
            self._flush_cumulative(message_id)  # what cumulative viewers were held back from: before the final
        self.replies.pop(message_id, None)
        conns = []
        final, timestamp = Final(event), frames.timestamp_from_epoch(event["at"])
        session_type = self._session_type(event["session_id"])
        for conn in self.hub.viewers(event["session_id"]):
            cursor = conn.cursors.pop(message_id, None)
            if cursor is not None and event.get("origin") != self.bus.instance_id:
                # A reply from another instance may end before all its text reached us (deltas cross late, or
                # only once someone here views it): the rest first, so the deltas still add up to the final.
                self._send(frames.chunk(final, conn.stream_mode, offset=cursor.offset,
                                        text=final.content[cursor.offset:], thinking_offset=cursor.thinking_offset,
                                        thinking=final.thinking[cursor.thinking_offset:], timestamp=timestamp,
                                        dialect=conn.dialect, session_type=session_type),
                           [conn])
            conn.finals_sent[message_id] = None
            if len(conn.finals_sent) > FINALS_REMEMBERED:
                del conn.finals_sent[next(iter(conn.finals_sent))]
            conns.append(conn)
        self._per_dialect(lambda dialect: frames.final(final, timestamp=timestamp, dialect=dialect,
                                                       session_type=session_type), conns)

    def _reset(self, event):
        self._send(frames.session_reset(event), self.hub.viewers(event["session_id"]))

    def _members(self, event):
        session_id, removed = event["session_id"], set(event["removed"])
        gone = [c for c in self.hub.viewers(session_id) if c.user_id in removed and not c.identity.is_admin]
        for conn in gone:
            self.leave(conn, session_id)
        self._send(frames.session_left(session_id, event.get("reason", "removed")), gone)
        # everyone still viewing it learns the new member list (the web app's members panel follows it)
        self._send(frames.session_members(event), self.hub.viewers(session_id))

    def _presence(self, event):
        session_id, user_id, origin = event["session_id"], event["user_id"], event["origin"]
        # A user is online once across instances: their tab's join or leave on one instance is news only when
        # no tab of theirs views the session anywhere else (here, or on a third instance).
        if user_id in self.bus.online_elsewhere(session_id, besides=origin) or (
                origin != self.bus.instance_id and user_id in self.hub.online(session_id)):
            return
        self._send(self.presence_frame(session_id, event["event"], event["user_id"], at=event["at"]),
                   self.hub.viewers(session_id))

    def _broadcast(self, event):
        self._send(frames.broadcast(event["message"], event["at"]), self.hub.of_pipeline(event.get("pipeline")))

    def _push(self, event):
        self._send(frames.push(event["message"], event.get("data"), event["at"]), self.hub.of_user(event["user_id"]))

    def _reconnect(self, event):
        if event.get("origin") != self.bus.instance_id:
            return  # this instance is draining: other instances' clients stay
        self._send(frames.reconnect(event.get("reason"), event["at"], event.get("retry_after")),
                   self.hub.of_pipeline())

    # who views what

    def join(self, conn, session_id, session_type="person", next_seq=None):
        """`next_seq`: the session's message counter as read from the store for this join (its `next_seq`):
        messages numbered after it reach the viewers here in order."""
        self.order.track(session_id, next_seq)
        for reply in self.replies.values():
            # a reply generating on another instance may reach us later than its start: not from 0 for this one
            if reply.session_id == session_id and reply.origin != self.bus.instance_id:
                reply.late.add(conn.id)
        if self.hub.join(conn, session_id, session_type) and self.hub.session_type(session_id) == "group":
            self.bus.publish(events.presence(session_id, "join", conn.user_id))

    def leave(self, conn, session_id):
        for message_id in [m for m, c in conn.cursors.items() if c.session_id == session_id]:
            del conn.cursors[message_id]
        group = self.hub.session_type(session_id) == "group"
        # user-level: a second tab of someone already online (or still online) is not news
        if self.hub.leave(conn, session_id) and group:
            self.bus.publish(events.presence(session_id, "leave", conn.user_id))
        if not self.hub.by_session.get(session_id):
            self.order.forget(session_id)

    def unregister(self, conn):
        for session_id in list(conn.sessions):
            self.leave(conn, session_id)
        conn.cursors.clear()
        self.hub.unregister(conn)

    def presence_frame(self, session_id, event="snapshot", user_id=None, at=None):
        online = self.hub.online(session_id) | self.bus.online_elsewhere(session_id)  # every instance's
        return frames.presence(session_id, event, online, user_id)

    # resume: the catch-up continues exactly where the live stream takes over

    def resume(self, conn, session_id, plan):
        """Send `resumed`, then each reply's text after its offsets, then (finished ones) its final; set cursors
        so the next live delta continues exactly there. `plan`: [(reply, offset, thinking_offset)], `reply` a
        frames.snapshot() of the stored message. Never awaits. Returns [(reply, offset, thinking_offset,
        source)] as sent, `source` = live | store | finished | sent.

        `sent`: the live stream already sent this connection the reply's final (it arrives before `resumed`:
        the client sent `resume` as the reply ended), so neither text nor a second final follows."""
        done = []
        for stored, offset, thinking_offset in plan:
            live = self.replies.get(stored.message_id)
            if stored.message_id in conn.finals_sent:
                done.append((stored, offset, thinking_offset, "sent"))
            elif live is not None:
                done.append((live, offset, thinking_offset, "live"))  # the client's offsets are what it has
            elif stored.status in LIVE:  # queued, or generating elsewhere: its deltas continue the stored text
                done.append((self.follow(stored), offset, thinking_offset, "store"))
            else:
                done.append((stored, offset, thinking_offset, "finished"))
        conn.send(frames.resumed(session_id, [(r, o, t) for r, o, t, _ in done]))
        timestamp = frames.timestamp()
        variant = {"dialect": conn.dialect, "session_type": self._session_type(session_id)}
        for reply, offset, thinking_offset, source in done:
            if source == "sent":
                continue
            if source != "finished":
                cursor = conn.cursors[reply.message_id] = Cursor(session_id, offset, thinking_offset)
            if source == "live" and not reply.stream:
                continue  # a non-streamed reply sends only its final frame
            content, thinking = reply.content, reply.thinking
            if source != "finished":  # follow from here; a client that followed the owner directly may be ahead
                cursor.offset, cursor.thinking_offset = max(offset, len(content)), max(thinking_offset, len(thinking))
            if (conn.stream_mode == "delta" and conn.dialect != frames.LANGBOT
                    and len(content) - offset + len(thinking) - thinking_offset > PAGE):
                conn.send_pages(reply.message_id, self._pages(reply, content, offset, thinking,
                                                         thinking_offset, timestamp, variant))
            else:
                frame = frames.chunk(reply, conn.stream_mode, offset=offset, text=content[offset:],
                                     thinking_offset=thinking_offset, thinking=thinking[thinking_offset:],
                                     timestamp=timestamp, **variant)
                self._send(frame, [conn])
            if source == "finished":
                self._send(frames.final(reply, timestamp=timestamp, **variant), [conn])
        return done

    def _pages(self, reply, content, offset, thinking, thinking_offset, timestamp, variant):
        """A huge delta-mode catch-up as frames of at most PAGE code points, made as the client reads them:
        the reasoning first, then the answer, each page continuing exactly where the previous ended."""
        pages = itertools.chain(
            ((offset, "", at, thinking[at:at + PAGE]) for at in range(thinking_offset, len(thinking), PAGE)),
            ((at, content[at:at + PAGE], len(thinking), "") for at in range(offset, len(content), PAGE)))
        for text_at, text, thinking_at, thought in pages:
            frame = frames.chunk(reply, "delta", offset=text_at, text=text, thinking_offset=thinking_at,
                                 thinking=thought, timestamp=timestamp, **variant)
            yield frame
