"""Resume: a client that reconnects gets exactly the text after its offsets, then the live stream, then the
one terminal frame (docs/protocol.md, "Resume").

The lookups await (access, the stored replies); then the reply logs (services/delivery/replylog.py) do the rest without
an await: the stored state is applied to each reply's log, `resumed` is sent, and the connection's reader of
each reply is placed at the client's offsets, so the text after them, the live stream and the final all come
from the one log, in order, once.
"""
import logging

from services.delivery.replylog import Stale
from services.wire import events, schema
from services.wire.codes import Code
from services.wire.errors import NotFound
from services.wire.schema import check_id

log = logging.getLogger(__name__)

MAX_RESUME = schema.MAX_RESUME  # replies named in one session-wide resume
REREADS = 3      # a reply read as live that ended meanwhile is read again (each read may race another end)


class Resumer:
    def __init__(self, store, fanout, streams, sessions, metrics=None):
        self.metrics = metrics
        self.store = store
        self.fanout = fanout
        self.streams = streams
        self.sessions = sessions

    async def resume(self, conn, frame):
        """Handle one `resume` frame: by `message_id`, or every live reply of a session (plus `offsets` named)."""
        if frame.message_id is not None:
            message_id = frame.message_id
            wanted = {message_id: (frame.offset, frame.thinking_offset, frame.epoch)}
            doc, session = await self._find(conn, message_id)
            docs = {message_id: doc}
            every_live = False
        else:
            session_id = frame.session_id or conn.primary_session
            check_id(session_id, "session_id")
            wanted = {m: (o.offset, o.thinking_offset, o.epoch) for m, o in frame.offsets.items()}
            session = await self.sessions.session(conn.identity, conn.pipeline, session_id)
            docs = {d["_id"]: d for d in await self.store.find_replies(session_id, list(wanted))}
            if missing := [m for m in wanted if m not in docs]:
                raise NotFound(f"no reply {missing[0]!r} in this session", code=Code.MESSAGE_NOT_FOUND,
                               message_id=missing[0])
            every_live = True
        for attempt in range(REREADS + 1):
            if conn.closed:
                return
            states = self._states(session["_id"], docs, every_live)
            try:
                # no await from here on: `resumed`, catch-up, readers and the join in one loop step
                plan = self.fanout.replies.resume(conn, session["_id"], states, wanted,
                                                  local=self.streams.generations)
                self.fanout.join(conn, session["_id"], session["type"], session.get("next_seq"))
                break
            except Stale as stale:  # it ended while we read it: the store has its end now
                if attempt == REREADS:
                    raise
                docs[stale.message_id] = await self.store.get_message(stale.message_id)
        if self.metrics is not None:
            for reply, offset, thinking_offset, source in plan:
                if source != "sent":
                    replayed = max(0, len(reply.content) - offset) + max(0, len(reply.thinking) - thinking_offset)
                    self.metrics.resumed(session["pipeline"], source, replayed)
        log.debug("resumed conn_id=%s session_id=%s replies=%s", conn.id, session["_id"],
                  [r.message_id for r, _, _, _ in plan])

    def _states(self, session_id, docs, every_live):
        """The stored replies as the logs take them; for a session-wide resume also the replies live here that
        were not named (queued ones, not stored as started yet: from their start)."""
        states = [events.reply_stored(doc) for doc in docs.values()]
        if every_live:
            named = set(docs)
            states += [events.reply_live(gen) for gen in self.streams.live(session_id) if gen.message_id not in named]
        return states

    async def _find(self, conn, message_id):
        doc = await self.store.find_message(message_id)
        if doc is not None and doc["role"] == "assistant":
            try:
                return doc, await self.sessions.session(conn.identity, conn.pipeline, doc["session_id"])
            except NotFound:
                pass  # someone else's (or another pipeline's): indistinguishable from unknown
        raise NotFound(f"no reply {message_id!r}", code=Code.MESSAGE_NOT_FOUND, message_id=message_id)

