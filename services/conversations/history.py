"""A session's history, read a page at a time, and its reset (what runs stops, the messages are forgotten)."""
from services.storage import paging
from services.wire import events
from services.wire.codes import Code
from services.wire.errors import BadRequest


class History:
    def __init__(self, store, bus, streams):
        self.store = store
        self.bus = bus
        self.streams = streams

    async def history_page(self, identity, session, *, after_seq=0, limit=50, cursor=None):
        """One page of a session's messages in order: (docs, next_cursor). A cursor wins over after_seq."""
        kind = f"messages:{session['_id']}"
        position = paging.decode(kind, cursor)
        if position is not None:
            if not isinstance(position, int) or isinstance(position, bool) or position < 0:
                raise BadRequest("cursor is not one this server gave out", code=Code.INVALID_CURSOR)
            after_seq = position
        docs = await self.store.list_messages(session["_id"], after_seq=after_seq, limit=limit + 1)
        return paging.page(docs, limit, kind, lambda d: d["seq"])

    async def reset(self, identity, session):
        """Stop whatever runs, then forget the session's messages. Their seq numbers are never reused."""
        stopped = self.streams.stop(session["_id"])
        await self.streams.ended(stopped)
        deleted = await self.store.delete_session_messages(session["_id"])
        self.bus.publish(events.Reset(session_id=session["_id"], deleted=deleted))
        return {"stopped": stopped, "deleted": deleted}
