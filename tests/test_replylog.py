"""One reply's log and its readers, proved by interleaving (Hypothesis stateful testing).

A model of the world around one instance's reply logs (services/delivery/replylog.py): the store's state of one reply
(status, epoch, checkpointed text), an owner generating it, the owner's deltas and final on the bus, a reaper
ending it when its owner is lost, a new owner continuing it from the checkpoint, a fenced owner that wakes and
keeps talking, the bus duplicating, reordering and losing events, re-reads of the store, viewers present from
the start, viewers that reconnect and resume at any offset at any moment (the store read and the answer apart,
as the await between them allows). After every step and at the end, for every viewer: what it was sent adds up
(offsets contiguous, nothing twice), text it was shown is never taken back without a `rewind`, it gets exactly one
final, nothing after it, and its text equals the stored text.

Pure logic with small fakes (a hub, connections that record frames): the end-to-end versions of these cases run
against real instances in tests/test_cluster*.py.
"""
import os

import msgspec
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.delivery import replylog

from services.delivery.replylog import ReplyLogs
from services.wire import events, frames
from services.wire.errors import BadRequest
from services.wire.outbox import encode
from services.wire.schema import LANGBOT_STRUCTS

SESSION, MESSAGE = "s1", "m1"
BASE = {"session_id": SESSION, "message_id": MESSAGE, "seq": 2, "reply_to": "u1"}


class FakeOutbox:
    def extend(self, *args):
        return False  # never busy: every frame is made and recorded


class FakeConn:
    def __init__(self, conn_id, *, dialect="parley", stream_mode="delta", created_at=0.0):
        self.id = conn_id
        self.dialect = dialect
        self.stream_mode = stream_mode
        self.created_at = created_at
        self.readers = {}
        self.finals_sent = {}
        self.outbox = FakeOutbox()
        self.frames = []

    def send(self, frame, text=None, nbytes=None):
        if not isinstance(frame, dict):  # a Struct sent to this connection alone: as the client reads it
            frame = msgspec.json.decode(encode(frame))
        self.frames.append(frame)
        return True

    def send_pages(self, message_id, pages):
        self.frames.extend(msgspec.json.decode(encode(page)) for page in pages)
        return True


class FakeHub:
    def __init__(self):
        self.by_session = {}

    def viewers(self, session_id):
        return list(self.by_session.get(session_id, {}).values())

    def join(self, conn):
        self.by_session.setdefault(SESSION, {})[conn.id] = conn


class Client:
    """What a Parley client holds of the reply, rebuilt from the frames one connection received (as
    static/parley.js applies them), carried over to the next connection when it reconnects."""

    def __init__(self, text="", thinking="", epoch=None):
        self.text, self.thinking = text, thinking
        self.epoch = epoch         # of the text held, as status, rewind and resumed frames said
        self.final = None

    def apply(self, conn, frame, reading):
        kind, data = frame["type"], frame["data"]
        if kind == "resumed":  # (the answer to a resume that crossed the final says so, and nothing follows)
            [entry] = data["replies"]
            if self.final is None:  # where this connection continues: what the client holds past it is void
                self.epoch = entry["epoch"]
                self.text, self.thinking = self.text[:entry["offset"]], self.thinking[:entry["thinking_offset"]]
            return
        assert self.final is None, f"a frame after the final on {conn.id}: {frame}"
        if kind == "status":  # the owner's epoch: that of the text held, when it holds none yet
            if not self.text and not self.thinking:
                self.epoch = data["epoch"]
            return
        if kind == "rewind":  # text past the offsets is void (held by a client of an older owner, or fenced)
            if self.epoch is None or data["epoch"] >= self.epoch:
                self.text, self.thinking = self.text[:data["offset"]], self.thinking[:data["thinking_offset"]]
                self.epoch = data["epoch"]
        elif kind == "response" and not data["is_final"]:
            if "delta" in data:
                assert data["offset"] == len(self.text), f"not contiguous on {conn.id}: {data['offset']} after {len(self.text)}"
                self.text += data["delta"]
            if "thinking_delta" in data:
                assert data["thinking_offset"] == len(self.thinking)
                self.thinking += data["thinking_delta"]
        elif kind == "response":
            if reading:  # a reader never has its text taken back silently: a rewind comes first
                assert data["content"].startswith(self.text), \
                    f"final {data['content']!r} after {self.text!r} on {conn.id}"
            self.final = data
            self.text, self.thinking = data["content"], data.get("thinking", "")


class Viewer:
    def __init__(self, conn, client, reading):
        self.conn = conn
        self.client = client
        self.reading = reading     # the server has a reader for it (present from the start, or resumed)
        self.seen = 0              # frames applied
        self.read = None           # a resume's store read, waiting for its answer
        self.closed = False


class Owner:
    def __init__(self, epoch, text):
        self.epoch = epoch
        self.text = text           # everything it generated
        self.alive = True


class ReplyMachine(RuleBasedStateMachine):
    @initialize(viewers=st.integers(1, 3), langbot=st.booleans())
    def setup(self, viewers, langbot):
        replylog.CUMULATIVE_INTERVAL = -1.0  # (restored in teardown) every cumulative frame goes out at once
        self.hub = FakeHub()
        self.logs = ReplyLogs(self.hub, self._send, instance_id="here", session_type=lambda s: "person",
                              want=self._want)
        self.store = {**BASE, "status": "streaming", "epoch": 1, "content": "", "thinking": "", "error": None,
                      "usage": None, "stream": True, "started_at": 1.0, "bases": []}
        self.owner = Owner(1, "")
        self.stale = []            # owners fenced out that still talk
        self.pending = []          # events on their way to this instance, in no guaranteed order
        self.viewers = []
        self.serial = 0
        self.now = 5.0             # the clock of connections and takeovers after the reply's first start
        for _ in range(viewers):
            self._viewer(Client(), reading=True, created_at=0.0)
        if langbot:
            conn = FakeConn("langbot", dialect="langbot", stream_mode="cumulative")
            self.hub.join(conn)
            self.langbot = conn
        else:
            self.langbot = None
        self.pending.append({"type": "reply.started", **BASE, "status": "streaming", "stream": True, "epoch": 1,
                             "origin": "owner", "at": 1.0})

    def _viewer(self, client, *, reading, created_at):
        self.serial += 1
        conn = FakeConn(f"c{self.serial}", created_at=created_at)
        self.hub.join(conn)
        viewer = Viewer(conn, client, reading)
        self.viewers.append(viewer)
        return viewer

    def _send(self, frame, conns):
        if frame is None:  # nothing to say (as FanOut._send, which also keeps extension frames from LangBot)
            return 0
        if type(frame) not in LANGBOT_STRUCTS:
            conns = [c for c in conns if c.dialect != frames.LANGBOT]
        frame = msgspec.json.decode(encode(frame))  # what goes on the wire, as the client reads it
        for conn in conns:
            conn.send(frame)
        return len(conns)

    def _want(self, session_id):
        # a cluster bus asks the owner for its whole text: a live owner answers with a sync from 0
        if self.owner is not None and self.owner.alive and self.store["status"] == "streaming":
            self.pending.append(self._delta(self.owner, 0, sync=True))

    def _delta(self, owner, offset, sync=False):
        event = {"type": "reply.delta", **BASE, "epoch": owner.epoch, "offset": offset,
                 "text": owner.text[offset:], "thinking_offset": 0, "thinking": "", "origin": "owner", "at": 2.0}
        if sync:
            event.update(sync=True, bases=self.store["bases"])
        return event

    # what happens to the reply

    @precondition(lambda self: self.owner is not None and self.owner.alive and self.store["status"] == "streaming")
    @rule(piece=st.sampled_from(["a", "bc", "def", "ghij", "é", "🙂x"]))
    def generate(self, piece):
        offset = len(self.owner.text)
        self.owner.text += piece
        self.pending.append(self._delta(self.owner, offset))

    @precondition(lambda self: self.stale)
    @rule(piece=st.sampled_from(["z", "zz"]))
    def a_fenced_owner_talks(self, piece):
        owner = self.stale[-1]
        offset = len(owner.text)
        owner.text += piece
        self.pending.append(self._delta(owner, offset))

    @precondition(lambda self: self.owner is not None and self.owner.alive and self.store["status"] == "streaming")
    @rule()
    def checkpoint(self):
        self.store["content"] = self.owner.text

    @precondition(lambda self: self.owner is not None and self.owner.alive and self.store["status"] == "streaming")
    @rule(status=st.sampled_from(["completed", "stopped", "failed"]))
    def the_owner_ends_it(self, status):
        self.store.update(status=status, content=self.owner.text)
        self.owner.alive = False
        self.pending.append({"type": "reply.final", **self._final_fields(), "origin": "owner", "at": 3.0})

    @precondition(lambda self: self.store["status"] == "streaming" and self.owner is not None)
    @rule()
    def the_owner_is_lost_and_reaped(self):
        """Its instance died (or paused past its lease): the reaper ends the reply with the stored text."""
        self.stale.append(self.owner)
        self.owner = None
        self.store.update(status="interrupted", epoch=self.store["epoch"] + 1,
                          error={"code": "instance_lost", "message": "lost"})
        self.pending.append({"type": "reply.final", **self._final_fields(), "origin": "reaper", "at": 3.0})

    @precondition(lambda self: self.store["status"] == "streaming" and self.owner is not None)
    @rule()
    def another_instance_continues_it(self):
        """Its owner is lost: a survivor claims it (a new epoch) and goes on from the stored text."""
        self.stale.append(self.owner)
        self.store["epoch"] += 1
        self.store["bases"] = self.store["bases"] + [[self.store["epoch"], len(self.store["content"]), 0]]
        self.owner = Owner(self.store["epoch"], self.store["content"])
        self.now += 1
        self.pending.append({"type": "reply.started", **BASE, "status": "streaming", "stream": True,
                             "epoch": self.owner.epoch, "bases": self.store["bases"], "origin": "survivor",
                             "at": self.now, "started_at": 1.0})  # (a continuation says when the reply began)

    @precondition(lambda self: self.stale and self.store["status"] != "streaming")
    @rule()
    def a_fenced_owner_wakes_and_publishes_the_stored_end(self):
        # its terminal write is refused: it publishes what the store holds (a second final on the bus)
        self.pending.append({"type": "reply.final", **self._final_fields(), "origin": "stale", "at": 4.0})

    def _stored(self):
        """The stored state as a read of the store gives it to the logs (services/wire/events.py reply_stored)."""
        return events.decode({"type": "reply.stored", **self.store})

    def _final_fields(self):
        return {**BASE, **{k: self.store[k] for k in ("status", "content", "thinking", "error", "usage", "epoch")}}

    # the bus

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def deliver(self, data):
        event = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self._dispatch(event)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def duplicate(self, data):
        self.pending.append(dict(data.draw(st.sampled_from(self.pending))))

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def lose(self, data):
        self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))

    @rule()
    def reread_the_store(self):
        self.logs.stored(self._stored())

    def _dispatch(self, event):
        handler = {"reply.started": self.logs.started, "reply.delta": self.logs.delta,
                   "reply.final": self.logs.final}[event["type"]]
        handler(events.decode(event))  # as a bus delivers it: the event's Struct

    # viewers

    @precondition(lambda self: any(not v.closed for v in self.viewers))
    @rule(data=st.data())
    def a_viewer_reconnects(self, data):
        viewer = data.draw(st.sampled_from([v for v in self.viewers if not v.closed]))
        self._drain_frames(viewer)
        viewer.closed = True
        del self.hub.by_session[SESSION][viewer.conn.id]
        client = Client(viewer.client.text, viewer.client.thinking, viewer.client.epoch)
        client.final = viewer.client.final
        self.now += 1
        self._viewer(client, reading=False, created_at=self.now)  # connected after the reply started

    @precondition(lambda self: self.owner is not None and self.owner.text)
    @rule(data=st.data())
    def a_client_arrives_from_another_instance(self, data):
        """It followed the reply on an instance that stopped, and holds some of what the owner generated: it
        connects here (where the reply's log may not exist yet) and resumes from what it holds."""
        held = data.draw(st.integers(1, len(self.owner.text)))
        self.now += 1
        self._viewer(Client(self.owner.text[:held], "", self.owner.epoch), reading=False, created_at=self.now)

    @precondition(lambda self: any(not v.closed and v.read is None and v.client.final is None
                                   for v in self.viewers))
    @rule(data=st.data())
    def a_viewer_asks_to_resume(self, data):
        viewer = data.draw(st.sampled_from([v for v in self.viewers
                                            if not v.closed and v.read is None and v.client.final is None]))
        self._drain_frames(viewer)
        # the store read; the answer comes later
        viewer.read = (self._stored(), (len(viewer.client.text), 0, viewer.client.epoch))

    @precondition(lambda self: any(not v.closed and v.read is not None for v in self.viewers))
    @rule(data=st.data())
    def a_resume_is_answered(self, data):
        viewer = data.draw(st.sampled_from([v for v in self.viewers if not v.closed and v.read is not None]))
        doc, asked = viewer.read
        viewer.read = None
        self._drain_frames(viewer)
        r = viewer.conn.readers.get(MESSAGE)
        viewer.client.debug = f"asked={asked} reader={(r.offset, r.thinking_offset) if r else None} doc={doc}"
        try:
            plan = self.logs.resume(viewer.conn, SESSION, [doc], {MESSAGE: asked})
        except replylog.Stale:
            plan = self.logs.resume(viewer.conn, SESSION, [self._stored()], {MESSAGE: asked})
        except BadRequest as err:
            # only for an offset beyond a text that was stored whole: a client cannot have more
            assert err.code == "invalid_offset"
            pytest.fail(f"a resume from what the server sent was refused: {viewer.client.debug} "
                        f"client={viewer.client.text!r} epoch={viewer.client.epoch} store={self.store}")
        [(_, _, _, source)] = plan
        viewer.reading = viewer.reading or source != "sent"

    def _drain_frames(self, viewer):
        frames = viewer.conn.frames
        while viewer.seen < len(frames):
            frame = frames[viewer.seen]
            viewer.seen += 1
            data = frame["data"]
            if frame["type"] in ("response", "rewind", "status") and data["message_id"] == MESSAGE or (
                    frame["type"] == "resumed" and data["replies"]):
                viewer.client.apply(viewer.conn, frame, viewer.reading)

    @invariant()
    def what_each_viewer_was_sent_adds_up(self):
        if not hasattr(self, "viewers"):
            return
        for viewer in self.viewers:
            if not viewer.closed:
                self._drain_frames(viewer)
        if self.langbot is not None:
            finals = [f for f in self.langbot.frames if f["type"] == "response" and f["data"]["is_final"]]
            assert len(finals) <= 1
            assert {f["type"] for f in self.langbot.frames} <= {"response"}, "an extension frame to LangBot"
            if finals:
                assert self.langbot.frames[-1] is finals[0], "a frame after LangBot's final"

    def teardown(self):
        try:
            if hasattr(self, "viewers"):
                self._settle_and_check()
        finally:
            replylog.CUMULATIVE_INTERVAL = 0.1

    def _settle_and_check(self):
        # The world settles: the reply ends (if it had not), every event still on its way arrives, open resumes
        # are answered, and the periodic re-read of the store runs once.
        if self.store["status"] == "streaming":
            if self.owner is not None and self.owner.alive:
                self.the_owner_ends_it("completed")
            else:
                self.the_owner_is_lost_and_reaped()
        while self.pending:
            self._dispatch(self.pending.pop(0))
        self.logs.stored(self._stored())
        # and every client still without its final resumes (as parley.js does on every connect)
        for viewer in self.viewers:
            if not viewer.closed and viewer.client.final is None:
                self._drain_frames(viewer)
                if viewer.client.final is None:
                    viewer.read = viewer.read or (self._stored(), (len(viewer.client.text), 0, viewer.client.epoch))
            if not viewer.closed and viewer.read is not None:
                self._answer(viewer)
        for viewer in self.viewers:
            if viewer.closed:
                continue
            self._drain_frames(viewer)
            finals = [f for f in viewer.conn.frames if f["type"] == "response" and f["data"]["is_final"]]
            assert len(finals) <= 1, f"{viewer.conn.id} got {len(finals)} finals"
            assert viewer.client.final is not None, f"{viewer.conn.id} never got a final"
            assert viewer.client.final["status"] == self.store["status"]
            assert viewer.client.text == self.store["content"]
        if self.langbot is not None:
            finals = [f for f in self.langbot.frames if f["type"] == "response" and f["data"]["is_final"]]
            # (LangBot's final says why a reply did not complete after its text: frames.final)
            assert len(finals) == 1 and finals[0]["data"]["content"].startswith(self.store["content"])

    def _answer(self, viewer):
        doc, asked = viewer.read
        viewer.read = None
        viewer.client.debug = f"asked={asked} doc={doc}"
        try:
            self.logs.resume(viewer.conn, SESSION, [doc], {MESSAGE: asked})
        except replylog.Stale:
            self.logs.resume(viewer.conn, SESSION, [self._stored()], {MESSAGE: asked})


ReplyMachine.TestCase.settings = settings(max_examples=int(os.environ.get("PARLEY_REPLYLOG_EXAMPLES", 300)), stateful_step_count=int(os.environ.get("PARLEY_REPLYLOG_STEPS", 40)), deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow],
                                          report_multiple_bugs=False)
test_one_reply_every_interleaving = ReplyMachine.TestCase


def test_a_reply_continued_here_is_read_from_its_start_only_by_viewers_from_before_it_began():
    """The log of a reply another instance continues is made here by the continuation's events. A viewer that
    connected since the reply began (it moved here from the instance that stopped, holding some of the reply)
    gets nothing of it until its `resume` says what it holds; one from before the reply began reads it from 0."""
    hub = FakeHub()

    def send(frame, conns):
        frame = msgspec.json.decode(encode(frame))
        for conn in conns:
            conn.send(frame)

    logs = ReplyLogs(hub, send, instance_id="here", session_type=lambda s: "person")
    early, moved = FakeConn("early", created_at=0.5), FakeConn("moved", created_at=6.0)
    hub.join(early)
    hub.join(moved)
    continued = {**BASE, "epoch": 2, "bases": [[2, 3, 0]], "origin": "survivor"}
    logs.started(events.decode({"type": "reply.started", **continued, "status": "streaming", "at": 7.0,
                                "started_at": 1.0}))
    logs.delta(events.decode({"type": "reply.delta", **continued, "offset": 0, "text": "abcdef",
                              "thinking_offset": 0, "thinking": "", "sync": True, "at": 7.5, "started_at": 1.0}))
    assert [(f["type"], f["data"].get("offset"), f["data"].get("delta")) for f in early.frames] == [
        ("status", None, None), ("response", 0, "abcdef")]
    assert [f["type"] for f in moved.frames] == ["status"]
    stored = events.decode({"type": "reply.stored", **continued, "status": "streaming", "content": "abcdef"})
    logs.resume(moved, SESSION, [stored], {MESSAGE: (4, 0, 1)})
    assert [(f["type"], f["data"].get("offset"), f["data"].get("delta")) for f in moved.frames[1:]] == [
        ("resumed", None, None), ("response", 3, "def")]  # its epoch-1 text is trusted up to where 2 took over


def test_a_reader_ahead_of_the_log_keeps_the_text_before_where_a_new_owner_took_the_reply_up():
    """A client resumed here holding more than this instance's log of the reply (it followed it elsewhere; the
    store read was older). A new owner takes the reply up from a stored point the client has: the rewind says
    that point, not the log's end, and the text before it is not sent again."""
    hub = FakeHub()

    def send(frame, conns):
        frame = msgspec.json.decode(encode(frame))
        for conn in conns:
            conn.send(frame)

    logs = ReplyLogs(hub, send, instance_id="here", session_type=lambda s: "person")
    moved = FakeConn("moved", created_at=6.0)
    hub.join(moved)
    stale = events.decode({"type": "reply.stored", **BASE, "epoch": 1, "status": "streaming", "content": "",
                           "started_at": 1.0})
    logs.resume(moved, SESSION, [stale], {MESSAGE: (26, 0, 1)})
    text = "a" * 26 + "bcd"
    continued = {**BASE, "epoch": 2, "bases": [[2, 26, 0]], "origin": "survivor"}
    logs.started(events.decode({"type": "reply.started", **continued, "status": "streaming", "at": 7.0,
                                "started_at": 1.0}))
    logs.delta(events.decode({"type": "reply.delta", **continued, "offset": 0, "text": text, "thinking_offset": 0,
                              "thinking": "", "sync": True, "at": 7.5, "started_at": 1.0}))
    sent = [(f["type"], f["data"].get("offset"), f["data"].get("delta")) for f in moved.frames]
    assert sent[0][0] == "resumed" and sent[1:] == [("rewind", 26, None), ("response", 26, "bcd")], sent
