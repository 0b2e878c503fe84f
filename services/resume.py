"""Resume: a client that reconnects gets exactly the text after its offsets, then the live stream, then the
one terminal frame (docs/protocol.md, "Resume").

Lookups await; then the fan-out (services/fanout.py) does the rest without an await: the replay is computed from
its live text and the connection's cursor is set in the same loop step, so the next delta continues exactly
where the replay ended. A reply that is not live here is replayed from MongoDB: a finished one with its terminal
frame; one still `streaming` but owned by no one here gets its terminal frame from the reaper when its lease
expires. A final the live stream already sent this connection is not sent again.
"""
import logging

from types import SimpleNamespace

from services import frames, schema
from services.chat import check_id
from services.codes import LIVE, Code, ReplyStatus
from services.errors import BadRequest, NotFound

log = logging.getLogger(__name__)

MAX_RESUME = schema.MAX_RESUME  # replies named in one session-wide resume
# Statuses whose stored text is everything that was streamed: an offset beyond it is a client error.
COMPLETE_TEXT = (ReplyStatus.COMPLETED, ReplyStatus.STOPPED, ReplyStatus.FAILED, ReplyStatus.TIMEOUT)


class Resumer:
    def __init__(self, store, fanout, streams, chat, metrics=None):
        self.metrics = metrics
        self.store = store
        self.fanout = fanout
        self.streams = streams
        self.chat = chat

    async def resume(self, conn, frame):
        """Handle one `resume` frame: by `message_id`, or every live reply of a session (plus `offsets` named)."""
        if frame.message_id is not None:
            message_id = frame.message_id
            wanted = {message_id: (frame.offset, frame.thinking_offset)}
            doc, session = await self._find(conn, message_id)
            session_id = doc["session_id"]
            docs = {message_id: doc}
            every_live = False
        else:
            session_id = frame.session_id or conn.primary_session
            check_id(session_id, "session_id")
            wanted = {m: (o.offset, o.thinking_offset) for m, o in frame.offsets.items()}
            session = await self.chat.session(conn.identity, conn.pipeline, session_id)
            docs = {d["_id"]: d for d in await self.store.find_replies(session_id, list(wanted))}
            if missing := [m for m in wanted if m not in docs]:
                raise NotFound(f"no reply {missing[0]!r} in this session", code=Code.MESSAGE_NOT_FOUND,
                               message_id=missing[0])
            every_live = True
        # A reply that ended while we looked it up is gone from the live map only after its terminal write:
        # read those again so the replay and the terminal frame come from the final state.
        # Each await may let another reply end, so look again until nothing is stale; each is read again once.
        refetched = set()
        while stale := [m for m, d in docs.items()
                        if d["status"] in LIVE and m not in self.streams.generations and m not in refetched]:
            for message_id in stale:
                docs[message_id] = await self.store.get_message(message_id)
                refetched.add(message_id)
        if conn.closed:
            return
        self._attach(conn, session, docs, wanted, every_live)  # no await from here on

    async def _find(self, conn, message_id):
        doc = await self.store.find_message(message_id)
        if doc is not None and doc["role"] == "assistant":
            try:
                return doc, await self.chat.session(conn.identity, conn.pipeline, doc["session_id"])
            except NotFound:
                pass  # someone else's (or another pipeline's): indistinguishable from unknown
        raise NotFound(f"no reply {message_id!r}", code=Code.MESSAGE_NOT_FOUND, message_id=message_id)

    def _attach(self, conn, session, docs, wanted, every_live):
        session_id = session["_id"]
        replies = {m: frames.snapshot(doc) for m, doc in docs.items()}
        if every_live:
            for gen in self.streams.live(session_id):
                replies.setdefault(gen.message_id, _queued(gen))
        plan = []
        for reply in sorted(replies.values(), key=lambda r: r.seq):
            offset, thinking_offset = wanted.get(reply.message_id, (0, 0))
            live = self.fanout.replies.get(reply.message_id)
            length, thinking_length = len(reply.content), len(reply.thinking)
            if live is not None:  # (one from another instance may lag the store here, or the store it)
                length, thinking_length = max(length, live.text.length), max(thinking_length, live.thinking_text.length)
            local = reply.message_id in self.streams.generations
            if (offset > length or thinking_offset > thinking_length) and not local and reply.status in LIVE:
                pass  # generating on another instance: a client that followed it there may be ahead of us
            elif offset > length or thinking_offset > thinking_length:
                if live is not None or local or reply.status in COMPLETE_TEXT:
                    raise BadRequest(f"offset beyond the {length} characters of reply "
                                     f"{reply.message_id!r}", code=Code.INVALID_OFFSET, message_id=reply.message_id)
                # Interrupted or orphaned: text after the last checkpoint is lost; the final frame is authoritative.
                offset, thinking_offset = min(offset, length), min(thinking_offset, thinking_length)
            plan.append((reply, offset, thinking_offset))
        self.fanout.join(conn, session_id, session["type"], session.get("next_seq"))
        sent = self.fanout.resume(conn, session_id, plan)
        if self.metrics is not None:
            for reply, offset, thinking_offset, source in sent:
                if source != "sent":
                    replayed = max(0, len(reply.content) - offset) + max(0, len(reply.thinking) - thinking_offset)
                    self.metrics.resumed(session["pipeline"], source, replayed)
        log.debug("resumed conn_id=%s session_id=%s replies=%s", conn.id, session_id,
                  [r.message_id for r, _, _ in plan])


def _queued(gen):
    """A live reply not yet looked up in the store: as far as it got (nothing, while queued)."""
    return SimpleNamespace(message_id=gen.message_id, session_id=gen.session_id, seq=gen.seq,
                           reply_to=gen.reply_to, status=gen.status, content="", thinking="", error=None,
                           usage=None)

