"""Every MongoDB query Parley makes, through PyMongo's async API.

Only features that behave the same on real MongoDB and on nx-27017: CRUD, bulk writes, indexes,
find_one_and_update. Message inserts, checkpoints and terminal writes issued together go out as one bulk write
(services/storage/batching.py: group commit).
Times are timezone-aware UTC datetimes, except `lease_until`: epoch seconds, compared across instances (and
nx-27017 turns a datetime written by $set into a string). Ids are uuid4 hex strings.
"""
import logging
import os
import time
import uuid
from datetime import datetime, timedelta, timezone

from bson import Binary
from pymongo import ASCENDING, DESCENDING, InsertOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from services.storage.batching import GroupCommit

from services.operations.metrics import Metrics, timed
from services.wire.codes import LIVE, TERMINAL, Code, ReplyCode, ReplyStatus
from services.wire.errors import NotFound

log = logging.getLogger(__name__)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

STOP_FIELDS = {"stop_requested": 1, "status": 1}
FILE_CHUNK = 255 * 1024  # bytes of a file per `file_chunks` document (GridFS's default chunk)
UPDATED_MS_MIGRATION = "sessions.updated_ms"  # the marker of _add_updated_ms in the `migrations` collection
FENCE_FIELDS = {"stop_requested": 1, "status": 1, "epoch": 1, "length": 1, "thinking_length": 1}


# what the reaper reads of every live message, to end it or take it over (services/cluster/reaper.py, failover.py)
TAKEOVER_FIELDS = {"lease_until": 1, "instance": 1, "epoch": 1, "status": 1, "length": 1, "thinking_length": 1,
                   "stop_requested": 1, "continuations": 1, "continued": 1, "handover": 1, "pipeline": 1,
                   "session_id": 1}
INSTANCE_LOST = {"code": ReplyCode.INSTANCE_LOST,
                 "message": "the server handling this reply went away before it finished"}


def assemble(doc):
    """A message as readers see it: the text checkpointed so far is `content` plus the appended parts (a
    streaming reply, or one the reaper ended, still has them; the owner's terminal write folds them in)."""
    if doc is None:
        return None
    if "text_parts" in doc or "thinking_parts" in doc:
        doc["content"] = (doc.get("content") or "") + "".join(doc.pop("text_parts", None) or ())
        doc["thinking"] = (doc.get("thinking") or "") + "".join(doc.pop("thinking_parts", None) or ())
    return doc


def stamp(*fields):
    """Set `fields` to the server's current time. `$currentDate`, not `$set` with a datetime: the same on MongoDB,
    and nx-27017 0.8.1 turns a datetime written by `$set` into a string (which then sorts and compares wrongly)."""
    return {"$currentDate": {f: True for f in fields}}


def utcnow():
    return datetime.now(timezone.utc)


def epoch_ms(moment):
    """Exact whole milliseconds since the epoch (integer arithmetic: no float rounding)."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def now_ms():
    return time.time_ns() // 1_000_000


def touched(**fields):
    """The update that marks a session used now (and sets `fields`): `updated_at`, the server's time shown to
    clients, and `updated_ms`, the integer epoch ms the sessions list sorts and pages by. A separate integer
    because nx-27017 keeps a `$currentDate` time below the millisecond and matches it against no date in a query
    (`$lt`, `$gt`, equality: nothing), though it sorts it right; an integer compares the same on both servers."""
    return {"$set": {**fields, "updated_ms": now_ms()}, **stamp("updated_at")}


def session_position(doc):
    """A session's place in its list: (updated_ms, _id); what a sessions cursor carries."""
    return doc["updated_ms"], doc["_id"]


def new_id():
    return uuid.uuid4().hex


def reply_id_for(user_message_id):
    """The id of the reply a send stores beside user message `user_message_id`: derived, not drawn, so that a
    repeat of the send that finds the user message without it stores the same reply, and only one lands."""
    return uuid.uuid5(uuid.NAMESPACE_OID, user_message_id).hex


def session_doc(*, pipeline, session_type, owner, members=(), title="", session_id=None, visitor=""):
    """A new session as it is stored."""
    now = utcnow()
    doc = {"_id": session_id or new_id(), "pipeline": pipeline, "type": session_type, "owner": owner,
           "members": sorted({owner, *members}), "title": title, "next_seq": 0,
           "created_at": now, "updated_at": now, "updated_ms": epoch_ms(now)}
    if visitor:  # a widget visitor's conversation: counted, and forgotten after --visitor-session-ttl
        doc["visitor"] = visitor
    return doc


def bus_db_name(db_name):
    return f"{db_name}_bus"


class Store:
    def __init__(self, client, db_name="parley", *, metrics=None):
        self.client = client
        self.metrics = metrics or Metrics()
        self.db = client[db_name]
        # The cluster bus's events (services/cluster/mongo_bus.py) in a database of their own: nx-27017 runs one command
        # of a database at a time, and the bus's polls (every 5 ms while a reply is live) and inserts would queue
        # with the message writes a stop or a final waits for. The same server; MongoDB is indifferent.
        self.bus_db = client[bus_db_name(db_name)]
        self.sessions = self.db.sessions
        self.messages = self.db.messages
        self.files = self.db.files
        self.file_chunks = self.db.file_chunks
        batched = lambda name: (lambda size: self.metrics.store_batched(name, size))  # noqa: E731
        self._inserts = GroupCommit(self._insert_batch, on_batch=batched("insert_messages"))
        self._checkpoints = GroupCommit(self._checkpoint_batch, on_batch=batched("checkpoint"))
        self._finishes = GroupCommit(self._finish_batch, on_batch=batched("finish"))
        # counters and first-message titles: background session writes, one bulk however many sends land at once
        self._session_writes = GroupCommit(self._session_batch, on_batch=batched("session_writes"))
        self._opens = GroupCommit(self._open_batch, on_batch=batched("get_or_create_session"))

    async def close(self):
        """Let the writes already gathered for a bulk write land (before the client closes)."""
        for batcher in (self._inserts, self._checkpoints, self._finishes, self._session_writes, self._opens):
            await batcher.close()

    async def create_indexes(self):
        await self.sessions.create_index([("members", ASCENDING)])
        await self.sessions.create_index([("pipeline", ASCENDING), ("updated_ms", DESCENDING)])
        await self.messages.create_index([("session_id", ASCENDING), ("seq", ASCENDING)], unique=True)
        await self.messages.create_index([("session_id", ASCENDING), ("client_msg_id", ASCENDING)], unique=True,
                                         partialFilterExpression={"client_msg_id": {"$type": "string"}})
        await self.messages.create_index([("status", ASCENDING), ("lease_until", ASCENDING)])
        await self.messages.create_index([("reply_to", ASCENDING)])
        await self.files.create_index([("owner", ASCENDING), ("sha256", ASCENDING)])
        await self.file_chunks.create_index([("file", ASCENDING)])
        await self.sessions.create_index([("visitor", ASCENDING), ("updated_ms", ASCENDING)])
        await self._add_updated_ms()

    async def _add_updated_ms(self):
        """Sessions stored before `updated_ms` existed get it from `updated_at`, once per store: the query is a
        collection scan on MongoDB (no index on a missing field), so a marker in `migrations` says it ran."""
        if await self.db.migrations.find_one({"_id": UPDATED_MS_MIGRATION}):
            return
        async for doc in self.sessions.find({"updated_ms": {"$exists": False}}, {"updated_at": 1}):
            await self.sessions.update_one({"_id": doc["_id"], "updated_ms": {"$exists": False}},
                                           {"$set": {"updated_ms": epoch_ms(doc["updated_at"])}})
        await self.db.migrations.update_one({"_id": UPDATED_MS_MIGRATION}, {"$set": {"done_ms": now_ms()}},
                                            upsert=True)

    async def check_change_streams(self):
        """Raise unless the server can open a change stream (MongoDB: a replica set; nx-27017 can)."""
        stream = await self.bus_db.events.watch()
        try:
            await stream.try_next()
        finally:
            await stream.close()

    @timed
    async def ping(self):
        await self.client.admin.command("ping")

    # sessions

    @timed
    async def create_session(self, *, pipeline, session_type, owner, members=(), title="", session_id=None,
                             visitor=""):
        doc = session_doc(pipeline=pipeline, session_type=session_type, owner=owner, members=members, title=title,
                          session_id=session_id, visitor=visitor)
        await self.sessions.insert_one(doc)
        return doc

    @timed
    async def get_or_create_session(self, *, session_id, pipeline, session_type, owner, visitor=""):
        """Race-free: a concurrent creator's insert wins and we read it back. Lookups issued together (a burst of
        new users' connections) go to the store as one read, and the sessions it did not find as one insert:
        two commands for the burst, not one or two per connection (nx-27017 runs them one at a time)."""
        doc = await self._opens.submit(session_doc(pipeline=pipeline, session_type=session_type, owner=owner,
                                                   session_id=session_id, visitor=visitor))
        return dict(doc)  # callers of one batch do not share a document

    async def _open_batch(self, items):
        ids = list({doc["_id"] for doc in items})
        found = {doc["_id"]: doc async for doc in self.sessions.find({"_id": {"$in": ids}})}
        new = {}
        for doc in items:
            if doc["_id"] not in found:
                new.setdefault(doc["_id"], doc)
        errors = {}
        if new:
            docs = list(new.values())
            try:
                await self.sessions.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                raced = []  # created meanwhile by another instance: read back
                for error in (exc.details or {}).get("writeErrors", []):
                    sid = docs[error["index"]]["_id"]
                    if error.get("code") == 11000:
                        raced.append(sid)
                    else:
                        errors[sid] = write_error(exc, error)
                found.update({doc["_id"]: doc async for doc in self.sessions.find({"_id": {"$in": raced}})})
            found.update((sid, doc) for sid, doc in new.items() if sid not in found and sid not in errors)
        return [errors.get(doc["_id"]) or found.get(doc["_id"]) or
                WriteError(f"session {doc['_id']!r} was neither found nor created", None, None) for doc in items]

    @timed
    async def find_session(self, session_id):
        return await self.sessions.find_one({"_id": session_id})

    @timed
    async def get_session(self, session_id):
        doc = await self.sessions.find_one({"_id": session_id})
        if not doc:
            raise NotFound(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
        return doc

    @timed
    async def list_sessions(self, *, pipeline, user, limit=100, before=None):
        """Most recently used first, ordered by (updated_ms, _id) descending: up to `limit` sessions below
        `before` = that pair for the last session of the previous page (a range query: see `touched`)."""
        # `$in` rather than `{"members": user}`: same meaning on MongoDB, but nx-27017 0.8.1 misses array
        # elements on an indexed array field with plain equality.
        query = {"pipeline": pipeline, "members": {"$in": [user]}}
        if before is not None:
            ms, sid = before
            query["$or"] = [{"updated_ms": {"$lt": ms}}, {"updated_ms": ms, "_id": {"$lt": sid}}]
        cursor = self.sessions.find(query).sort([("updated_ms", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [doc async for doc in cursor]

    @timed
    async def set_title(self, session_id, title):
        await self.sessions.update_one({"_id": session_id}, touched(title=title))
        return await self.get_session(session_id)

    @timed
    async def name_untitled(self, session_id, title):
        """Give a session without a title this one (a rename, or an earlier naming, wins). Writes issued together
        go out as one bulk, with the counters (advance_seq): a burst of first messages names its sessions in one
        command, not one each ahead of the next sends' insert (nx-27017 runs a database's commands one at a time)."""
        await self._session_writes.submit(({"_id": session_id, "title": {"$in": ["", None]}},
                                           {"$set": {"title": title}}))

    @timed
    async def change_members(self, session_id, *, add=(), remove=()):
        if add:
            await self.sessions.update_one({"_id": session_id}, {"$addToSet": {"members": {"$each": list(add)}}})
        if remove:
            await self.sessions.update_one({"_id": session_id}, {"$pull": {"members": {"$in": list(remove)}}})
        return await self.get_session(session_id)

    @timed
    async def next_seqs(self, session_id, count=1, *, pipeline=None, member=None):
        """Reserve `count` consecutive message numbers atomically; returns the first. With `pipeline` and
        `member`, only in a session of that pipeline that has that member (the access check of a send, in the
        same write): otherwise session_not_found."""
        query = {"_id": session_id}
        if pipeline is not None:
            query["pipeline"] = pipeline
        if member is not None:
            query["members"] = {"$in": [member]}  # `$in`: see list_sessions
        doc = await self.sessions.find_one_and_update(
            query, {"$inc": {"next_seq": count}, **touched()}, projection={"next_seq": 1},
            return_document=ReturnDocument.AFTER)
        if not doc:
            raise NotFound(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
        return doc["next_seq"] - count + 1

    @timed
    async def advance_seq(self, session_id, counter):
        """Raise a session's counter to at least `counter` (numbers taken from memory:
        services/conversations/numbers.py), and mark it used now, as next_seqs does. Writes issued together go out as
        one bulk (with names)."""
        await self._session_writes.submit(({"_id": session_id}, {"$max": {"next_seq": counter}, **touched()}))

    async def _session_batch(self, items):
        await self.sessions.bulk_write([UpdateOne(query, update) for query, update in items], ordered=False)
        return [None] * len(items)

    @timed
    async def repair_seq(self, session_id):
        """Raise a session's counter past the highest number its messages hold (a counter written after its
        messages, and lost in between: services/conversations/numbers.py)."""
        last = await self.messages.find_one({"session_id": session_id}, {"seq": 1}, sort=[("seq", DESCENDING)])
        if last is not None:
            await self.sessions.update_one({"_id": session_id}, {"$max": {"next_seq": last["seq"]}})

    # one reply at a time per session, across instances (cluster mode)

    @timed
    async def claim_turn(self, session_id, message_id, seq):
        """Take the session's generation turn for reply `message_id` (number `seq`): only when it is the oldest
        live reply of the session and no other reply holds the turn (compare-and-set on the session).
        True: ours. False: wait. None: this reply is no longer live (ended elsewhere)."""
        oldest = await self.messages.find_one(
            {"session_id": session_id, "role": "assistant", "status": {"$in": list(LIVE)}, "seq": {"$lte": seq}},
            {"_id": 1}, sort=[("seq", ASCENDING)])
        if oldest is None:
            return None
        if oldest["_id"] != message_id:
            return False
        if await self._take_turn(session_id, message_id):
            return True
        # Held by another reply. A live one releases it when it ends; one that has ended or is gone (its instance
        # died between its terminal write and the release, a reset deleted it) never will: free it here.
        session = await self.sessions.find_one({"_id": session_id}, {"generating": 1})
        holder = (session or {}).get("generating")
        if holder in (None, message_id) or await self.messages.find_one(
                {"_id": holder, "status": {"$in": list(LIVE)}}, {"_id": 1}):
            return False
        log.info("turn: session_id=%s was held by reply %s, which has ended or is gone: freed", session_id, holder)
        await self.sessions.update_one({"_id": session_id, "generating": holder}, {"$set": {"generating": None}})
        return await self._take_turn(session_id, message_id)

    async def _take_turn(self, session_id, message_id):
        doc = await self.sessions.find_one_and_update(
            {"_id": session_id, "generating": {"$in": [None, message_id]}}, {"$set": {"generating": message_id}},
            projection={"generating": 1})
        return doc is not None

    @timed
    async def missing_before(self, session_id, seq, window=32):
        """The numbers in [seq - window, seq) no message holds. Every number below `seq` was reserved by a send:
        one missing is a send whose insert has not landed yet (or a send that failed, or a reset's deletion)."""
        low = max(1, seq - window)
        cursor = self.messages.find({"session_id": session_id, "seq": {"$gte": low, "$lt": seq}}, {"seq": 1})
        have = {doc["seq"] async for doc in cursor}
        missing = [n for n in range(low, seq) if n not in have]
        if missing:  # (rare: one more read) numbers a reset deleted are not on their way
            session = await self.sessions.find_one({"_id": session_id}, {"reset_seq": 1})
            floor = (session or {}).get("reset_seq") or 0
            missing = [n for n in missing if n > floor]
        return missing

    @timed
    async def seq_counters(self, session_ids):
        """{session id: its message counter (the last number reserved)} for up to a few hundred sessions."""
        cursor = self.sessions.find({"_id": {"$in": list(session_ids)}}, {"next_seq": 1})
        return {doc["_id"]: doc.get("next_seq") async for doc in cursor}

    @timed
    async def release_turn(self, session_id, message_id):
        await self.sessions.update_one({"_id": session_id, "generating": message_id}, {"$set": {"generating": None}})

    @timed
    async def count_live_replies(self, session_id):
        return await self.messages.count_documents(
            {"session_id": session_id, "role": "assistant", "status": {"$in": list(LIVE)}})

    # messages

    @timed
    async def insert_messages(self, docs):
        """Insert one send's messages (the user's, then its reply), both or neither landing for a duplicate
        `client_msg_id`. Sends issued together share one bulk insert (see _insert_batch)."""
        return await self._inserts.submit(docs)

    async def _insert_batch(self, sends):
        if len(sends) == 1:
            try:
                await self.messages.insert_many(sends[0], ordered=True)
                return [None]
            except BulkWriteError as exc:
                return [write_error(exc, next(iter((exc.details or {}).get("writeErrors", [])), None))]
        # One unordered bulk: every send's messages, except the reply of an idempotent send (one with a
        # `client_msg_id`, whose user message may collide with another tab's): those go in a second bulk, only
        # for the user messages that landed, so a losing send never leaves a reply behind.
        results = [None] * len(sends)
        first, owner, later = [], [], []
        for i, docs in enumerate(sends):
            idempotent = "client_msg_id" in docs[0]
            for doc in docs[:1] if idempotent else docs:
                first.append(InsertOne(doc))
                owner.append(i)
            if idempotent:
                later.append(i)
        for i, error in (await self._bulk_errors(first, owner)).items():
            results[i] = error
        second = [i for i in later if results[i] is None and len(sends[i]) > 1]
        if second:
            errors = await self._bulk_errors([InsertOne(d) for i in second for d in sends[i][1:]],
                                             [i for i in second for _ in sends[i][1:]])
            for i, error in errors.items():
                results[i] = error
        return results

    async def _bulk_errors(self, ops, owner):
        """Run an unordered bulk write; {owner[index]: its error} for the operations that failed alone (a
        failure of the whole call, a timeout say, fails every owner)."""
        try:
            await self.messages.bulk_write(ops, ordered=False)
            return {}
        except BulkWriteError as exc:
            errors = {}
            for error in (exc.details or {}).get("writeErrors", []):
                errors.setdefault(owner[error["index"]], write_error(exc, error))
            return errors
        except Exception as exc:
            return {i: exc for i in owner}

    @timed
    async def find_by_client_msg_id(self, session_id, client_msg_id):
        return await self.messages.find_one({"session_id": session_id, "client_msg_id": client_msg_id})

    @timed
    async def find_reply(self, user_message_id):
        return assemble(await self.messages.find_one({"reply_to": user_message_id}))

    @timed
    async def get_message(self, message_id):
        doc = await self.messages.find_one({"_id": message_id})
        if not doc:
            raise NotFound(f"no message {message_id!r}", code=Code.MESSAGE_NOT_FOUND)
        return assemble(doc)

    @timed
    async def find_message(self, message_id):
        return assemble(await self.messages.find_one({"_id": message_id}))

    @timed
    async def find_messages(self, message_ids):
        cursor = self.messages.find({"_id": {"$in": list(message_ids)}})
        return [assemble(doc) async for doc in cursor]

    @timed
    async def find_replies(self, session_id, message_ids):
        if not message_ids:
            return []
        cursor = self.messages.find({"_id": {"$in": list(message_ids)}, "session_id": session_id,
                                     "role": "assistant"})
        return [assemble(doc) async for doc in cursor]

    @timed
    async def list_messages(self, session_id, *, after_seq=0, limit=50):
        cursor = (self.messages.find({"session_id": session_id, "seq": {"$gt": after_seq}})
                  .sort("seq", ASCENDING).limit(limit))
        return [assemble(doc) async for doc in cursor]

    @timed
    async def last_message(self, session_id):
        """The session's message with the highest number (None when it has none)."""
        return assemble(await self.messages.find_one({"session_id": session_id}, sort=[("seq", DESCENDING)]))

    @timed
    async def supersede(self, message_id, by):
        """Mark a reply as replaced by a regenerated one (`by`), unless one already replaced it: True if this
        call did (two regenerates of one reply at once: one wins)."""
        result = await self.messages.update_one({"_id": message_id, "superseded_by": None},
                                                {"$set": {"superseded_by": by}})
        return result.matched_count == 1

    @timed
    async def unsupersede(self, message_id, by):
        """Undo supersede() when the regenerated reply could not be stored."""
        await self.messages.update_one({"_id": message_id, "superseded_by": by}, {"$unset": {"superseded_by": ""}})

    @timed
    async def recent_messages(self, session_id, *, before_seq, limit):
        """The `limit` messages just before `before_seq` (None: the latest), oldest first (context for a provider).
        Replies replaced by a regenerated one are left out: the model sees one answer per question."""
        query = {"session_id": session_id, "superseded_by": None}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        cursor = (self.messages.find(query)
                  .sort("seq", DESCENDING).limit(limit))
        docs = [assemble(doc) async for doc in cursor]
        return docs[::-1]

    @timed
    async def mark_streaming(self, message_id, *, instance, lease_until):
        """Claim a queued reply: a new fencing `epoch` that every later write of ours must match. Returns the
        message's `stop_requested`, `status` and `epoch` (None if it is no longer queued)."""
        return await self.messages.find_one_and_update(
            {"_id": message_id, "status": "queued"},
            {"$set": {"status": "streaming", "instance": instance, "lease_until": lease_until,
                      "length": 0, "thinking_length": 0, "text_parts": [], "thinking_parts": []},
             "$inc": {"epoch": 1}, **stamp("started_at")},
            projection=FENCE_FIELDS, return_document=ReturnDocument.AFTER)

    @timed
    async def checkpoint(self, message_id, *, epoch, offset, text, thinking_offset, thinking, lease_until):
        """Append the text streamed since the last checkpoint (`text` starts at `offset`) and renew the lease.

        Only by the epoch that claimed the reply, only while it is live, and only right after the previous
        checkpoint (`length == offset`): a late or repeated write never lands twice, and a paused instance
        whose reply another instance ended cannot write at all. Returns `stop_requested`, `status`, `epoch`
        and the stored lengths, or None when the write was refused (see `fenced()`).
        """
        return await self._checkpoints.submit(
            {"_id": message_id, "epoch": epoch, "offset": offset, "text": text, "thinking_offset": thinking_offset,
             "thinking": thinking, "lease_until": lease_until})

    async def _checkpoint_batch(self, items):
        """Every live reply's checkpoint in one bulk write. All matched (the usual case): each landed, and only
        the stop flags are read back (one query for the whole batch). Fewer matched than sent: the batch's
        replies are read back to find out which landed. A lone checkpoint (an idle store, one live reply) is one
        find_one_and_update instead: one round trip, where a terminal write or a resume may be waiting behind it."""
        ops = []
        for c in items:
            update = {"$set": {"length": c["offset"] + len(c["text"]),
                               "thinking_length": c["thinking_offset"] + len(c["thinking"]),
                               "lease_until": c["lease_until"]}, **stamp("updated_at")}
            pushes = {k: v for k, v in (("text_parts", c["text"]), ("thinking_parts", c["thinking"])) if v}
            if pushes:
                update["$push"] = pushes
            ops.append(({"_id": c["_id"], "epoch": c["epoch"], "status": "streaming", "length": c["offset"],
                         "thinking_length": c["thinking_offset"]}, update))
        if len(ops) == 1:
            return [await self.messages.find_one_and_update(*ops[0], projection=FENCE_FIELDS,
                                                            return_document=ReturnDocument.AFTER)]
        result = await self.messages.bulk_write([UpdateOne(*op) for op in ops], ordered=False)
        ids = [c["_id"] for c in items]
        if result.matched_count == len(items):
            stopped = {doc["_id"] async for doc in self.messages.find(
                {"_id": {"$in": ids}, "stop_requested": {"$exists": True}}, {"stop_requested": 1})
                if doc.get("stop_requested")}
            return [{"_id": c["_id"], "stop_requested": c["_id"] in stopped, "status": "streaming",
                     "epoch": c["epoch"], "length": c["offset"] + len(c["text"]),
                     "thinking_length": c["thinking_offset"] + len(c["thinking"])} for c in items]
        stored = {doc["_id"]: doc async for doc in self.messages.find({"_id": {"$in": ids}}, FENCE_FIELDS)}
        return [doc if (doc := stored.get(c["_id"])) is not None and doc.get("epoch") == c["epoch"]
                and doc.get("status") == "streaming" and doc.get("length") == c["offset"] + len(c["text"])
                and doc.get("thinking_length") == c["thinking_offset"] + len(c["thinking"]) else None
                for c in items]

    @timed
    async def request_stop(self, session_id, message_ids):
        """Record a stop, so a generation honours it at its next checkpoint (harmless on a finished one)."""
        result = await self.messages.update_many(
            {"_id": {"$in": list(message_ids)}, "session_id": session_id},
            {"$set": {"stop_requested": True}, **stamp("stop_requested_at")})
        return result.modified_count

    @timed
    async def request_session_stop(self, session_id):
        """A stop of a whole session: every live reply of it, whichever instance generates it."""
        result = await self.messages.update_many(
            {"session_id": session_id, "role": "assistant", "status": {"$in": list(LIVE)}},
            {"$set": {"stop_requested": True}, **stamp("stop_requested_at")})
        return result.modified_count

    @timed
    async def renew_leases(self, message_ids, *, lease_until):
        """Keep our live messages (including queued and silent ones) from looking abandoned."""
        if not message_ids:
            return 0
        result = await self.messages.update_many(
            {"_id": {"$in": list(message_ids)}, "status": {"$in": list(LIVE)}}, {"$set": {"lease_until": lease_until}})
        return result.modified_count

    @timed
    async def live_leases(self, *, exclude=(), limit=1000):
        """Every live message except `exclude`, with what the reaper and a takeover decide by (its owner, lease,
        epoch, stored lengths, stop flag, continuations). Live messages are few (in flight only), and expiry is
        decided by the caller: nx-27017 misses explicit nulls in an indexed `$or`."""
        query = {"status": {"$in": list(LIVE)}}
        if exclude:
            query["_id"] = {"$nin": list(exclude)}
        cursor = self.messages.find(query, TAKEOVER_FIELDS).limit(limit)
        return [doc async for doc in cursor]

    # taking a reply over from an instance that is gone (services/cluster/failover.py)

    @timed
    async def take_over(self, doc, *, instance, lease_until, reason):
        """Claim a streaming reply whose owner is gone, to continue it here: a compare-and-set on the epoch and
        the stored lengths read (so exactly one claimer wins, the text it continues from is the stored text, and
        the old owner, should it wake, is fenced out by the new epoch). Records where this owner took it up
        (`continued`). Returns the claimed message (text assembled), or None."""
        epoch, length, thinking_length = doc["epoch"], doc["length"], doc.get("thinking_length") or 0
        claimed = await self.messages.find_one_and_update(
            {"_id": doc["_id"], "status": ReplyStatus.STREAMING, "epoch": epoch, "length": length,
             "thinking_length": thinking_length},
            # the whole list, not a $push: nx-27017 stores a pushed document as a string (the epoch in the
            # condition makes this read-modify-write safe: every change to `continued` raises it)
            {"$set": {"instance": instance, "lease_until": lease_until, "handover": False,
                      "continued": [*(doc.get("continued") or ()), {
                          "epoch": epoch + 1, "offset": length, "thinking_offset": thinking_length,
                          "reason": reason, "from": doc.get("instance"), "at_ms": now_ms()}]},
             "$inc": {"epoch": 1, "continuations": 1}},
            return_document=ReturnDocument.AFTER)
        return assemble(claimed)

    @timed
    async def adopt(self, doc, *, instance, lease_until):
        """Claim a queued reply whose instance is gone, to run it here (it had not started: nothing to continue)."""
        return await self.messages.find_one_and_update(
            {"_id": doc["_id"], "status": ReplyStatus.QUEUED, "epoch": doc.get("epoch") or 0,
             "instance": doc.get("instance")},
            {"$set": {"instance": instance, "lease_until": lease_until, "handover": False}},
            return_document=ReturnDocument.AFTER)

    @timed
    async def release(self, message_id, *, epoch, content, thinking):
        """A draining owner hands a streaming reply over: all its text stored, its lease given up, `handover` set
        for the others' reapers. Fenced like a checkpoint (our epoch, still streaming). True if it landed."""
        result = await self.messages.update_one(
            {"_id": message_id, "epoch": epoch, "status": ReplyStatus.STREAMING},
            {"$set": {"content": content, "thinking": thinking, "length": len(content),
                      "thinking_length": len(thinking), "lease_until": 0, "handover": True},
             "$unset": {"text_parts": "", "thinking_parts": ""}, **stamp("updated_at")})
        return result.modified_count == 1

    @timed
    async def release_queued(self, message_ids, *, instance):
        """A draining instance's queued replies, given up for another instance to run."""
        if not message_ids:
            return 0
        result = await self.messages.update_many(
            {"_id": {"$in": list(message_ids)}, "status": ReplyStatus.QUEUED, "instance": instance},
            {"$set": {"lease_until": 0, "handover": True}})
        return result.modified_count

    # the cluster bus's events (services/cluster/mongo_bus.py): a TTL-indexed collection read through a change stream

    async def create_events_index(self, ttl_seconds):
        await self.bus_db.events.create_index([("created", ASCENDING)], expireAfterSeconds=ttl_seconds)

    @timed
    async def insert_events(self, origin, events):
        now = utcnow()
        await self.bus_db.events.insert_many([{"origin": origin, "created": now, "event": e} for e in events],
                                         ordered=True)

    async def watch_events(self, resume_token=None):
        """Everyone's events as they are inserted (from `resume_token` on, when given)."""
        options = {"resume_after": resume_token} if resume_token else {}
        return await self.bus_db.events.watch([{"$match": {"operationType": "insert"}}], **options)

    # instance liveness (services/cluster/liveness.py)

    @timed
    async def heartbeat(self, instance_id, beat):
        await self.db.instances.update_one({"_id": instance_id},
                                           {"$set": {"beat": beat, "stopped": False, "at_ms": now_ms()}},
                                           upsert=True)

    @timed
    async def instance_stopped(self, instance_id):
        await self.db.instances.update_one({"_id": instance_id}, {"$set": {"stopped": True, "at_ms": now_ms()}})

    @timed
    async def instance_beats(self, within_ms=24 * 3600 * 1000):
        """{instance id: (heartbeat counter, stopped)} of the instances heard of in the last day."""
        cursor = self.db.instances.find({"at_ms": {"$gt": now_ms() - within_ms}})
        return {doc["_id"]: (doc.get("beat"), bool(doc.get("stopped"))) async for doc in cursor}

    @timed
    async def interrupt_abandoned(self, message_id, *, lease_until=None, epoch=None, status=ReplyStatus.INTERRUPTED,
                                  error=INSTANCE_LOST):
        """End a message whose instance is gone (`interrupted`, or `stopped` when a stop was asked for) if it is
        still live with the very lease we saw expire, or (its instance is gone) still of the epoch we saw: a
        compare-and-set, so a renewal (of an expired lease) or a finish since then wins. Returns the updated
        message, or None."""
        condition = {"lease_until": lease_until} if epoch is None else {"epoch": epoch}
        doc = await self.messages.find_one_and_update(
            {"_id": message_id, "status": {"$in": list(LIVE)}, **condition},
            {"$set": {"status": status, "lease_until": None, "error": error},
             "$inc": {"epoch": 1},  # fences the old owner out: none of its later writes can land
             **stamp("updated_at", "finished_at")},
            return_document=ReturnDocument.AFTER)
        if doc is not None:  # its turn in the session (cluster mode) passes on
            await self.sessions.update_one({"_id": doc["session_id"], "generating": message_id},
                                           {"$set": {"generating": None}})
        if doc is not None and ("text_parts" in doc or "thinking_parts" in doc):
            doc = assemble(doc)  # fold the checkpointed parts into the text (no string append in an update)
            await self.messages.update_one(
                {"_id": message_id, "epoch": doc["epoch"]},
                {"$set": {"content": doc["content"], "thinking": doc["thinking"]},
                 "$unset": {"text_parts": "", "thinking_parts": ""}})
        return doc

    @timed
    async def finish(self, message_id, *, epoch, status, content, thinking, error=None, usage=None, model=None,
                     stop_requested=False):
        """The terminal write, fenced like a checkpoint. Returns True if it landed; False if the reply is no
        longer ours (another instance's reaper ended it): the stored message is then the truth.
        `stop_requested`: a stop reached the generation here; recorded as `request_stop` would."""
        assert status in TERMINAL, status
        fields = {"status": status, "content": content, "thinking": thinking, "error": error, "lease_until": None,
                  "length": len(content), "thinking_length": len(thinking)}
        stamps = ("updated_at", "finished_at")
        if stop_requested:
            fields["stop_requested"] = True
            stamps += ("stop_requested_at",)
        if usage:
            fields["usage"] = usage
        if model:
            fields["model"] = model
        return await self._finishes.submit((message_id, epoch, status, fields, stamps))

    async def _finish_batch(self, items):
        """Terminal writes issued together, as one bulk write. All matched: each landed. Otherwise the batch's
        messages are read back: ours landed where the stored epoch is ours and the status the one we wrote
        (which also recognizes a write that landed on an earlier attempt whose answer was lost)."""
        result = await self.messages.bulk_write([UpdateOne(
            {"_id": message_id, "epoch": epoch, "status": {"$in": list(LIVE)}},
            {"$set": fields, "$unset": {"text_parts": "", "thinking_parts": ""}, **stamp(*stamps)})
            for message_id, epoch, _, fields, stamps in items], ordered=False)
        if result.matched_count == len(items):
            return [True] * len(items)
        stored = {doc["_id"]: doc async for doc in self.messages.find(
            {"_id": {"$in": [item[0] for item in items]}}, {"status": 1, "epoch": 1})}
        return [(doc := stored.get(message_id)) is not None and doc.get("epoch") == epoch
                and doc.get("status") == status for message_id, epoch, status, *_ in items]

    @timed
    async def delete_session_messages(self, session_id):
        # First mark how far the numbers went (`reset_seq`): a reply waiting for earlier numbers of its session
        # (cluster turns, `missing_before`) must not wait for the ones deleted here.
        session = await self.sessions.find_one({"_id": session_id}, {"next_seq": 1})
        if session is not None:
            await self.sessions.update_one({"_id": session_id}, {"$max": {"reset_seq": session.get("next_seq", 0)}})
        result = await self.messages.delete_many({"session_id": session_id})
        return result.deleted_count

    # widget visitors (services/access/visitors.py)

    @timed
    async def count_visitor_sessions(self):
        return await self.sessions.count_documents({"visitor": {"$exists": True}})

    @timed
    async def expired_visitor_sessions(self, cutoff_ms, limit):
        cursor = self.sessions.find({"visitor": {"$exists": True}, "updated_ms": {"$lt": cutoff_ms}},
                                    {"_id": 1, "owner": 1}).limit(limit)
        return [doc async for doc in cursor]

    @timed
    async def delete_visitor_session(self, doc):
        """A visitor's conversation, its messages and the files it alone showed."""
        sid = doc["_id"]
        await self.messages.delete_many({"session_id": sid})
        files = [f async for f in self.files.find({"owner": doc["owner"], "sessions": {"$in": [sid]}},
                                                  {"_id": 1, "size": 1})]
        if files:
            keys = [f["_id"] for f in files]
            await self.file_chunks.delete_many({"file": {"$in": keys}})
            await self.files.delete_many({"_id": {"$in": keys}})
            await self.db.file_usage.update_one({"_id": doc["owner"]},
                                                {"$inc": {"bytes": -sum(f["size"] for f in files),
                                                          "files": -len(files)}})
        await self.sessions.delete_one({"_id": sid})

    @timed
    async def set_feedback(self, session_id, message_id, rating):
        """A visitor's rating of a reply (`message_id`: its seq, as widgets show it, or its id). True if stored."""
        query = {"session_id": session_id, "role": "assistant"}
        query["seq" if isinstance(message_id, int) else "_id"] = message_id
        if rating == "cancel":
            update = {"$unset": {"feedback": ""}}
        else:
            update = {"$set": {"feedback": {"rating": rating, "at_ms": now_ms()}}}
        result = await self.messages.update_one(query, update)
        return result.matched_count == 1

    # files: bytes in `file_chunks` (FILE_CHUNK bytes each), metadata in `files`, never inside a message

    @timed
    async def signing_key(self):
        """The key every instance signs file links and visitor tokens with, made once per store."""
        doc = await self.db.meta.find_one({"_id": "signing_key"})
        if doc is None:
            try:
                await self.db.meta.insert_one({"_id": "signing_key", "key": Binary(os.urandom(32))})
            except DuplicateKeyError:
                pass  # another instance made it first
            doc = await self.db.meta.find_one({"_id": "signing_key"})
        return bytes(doc["key"])

    @timed
    async def insert_file(self, doc, data):
        """The chunks first, then the document that makes them visible: a file that can be found is whole."""
        chunks = [{"_id": f"{doc['_id']}:{n}", "file": doc["_id"], "n": n,
                   "data": Binary(data[start:start + FILE_CHUNK])}
                  for n, start in enumerate(range(0, len(data), FILE_CHUNK))]
        if chunks:
            await self.file_chunks.insert_many(chunks)
        await self.files.insert_one({**doc, "chunks": len(chunks)})
        return doc

    @timed
    async def find_file(self, key):
        return await self.files.find_one({"_id": key})

    @timed
    async def find_file_by_hash(self, owner, kind, sha256):
        return await self.files.find_one({"owner": owner, "kind": kind, "sha256": sha256})

    @timed
    async def read_file(self, doc):
        ids = [f"{doc['_id']}:{n}" for n in range(doc["chunks"])]
        found = {c["_id"]: c["data"] async for c in self.file_chunks.find({"_id": {"$in": ids}})}
        if len(found) != len(ids):
            raise NotFound(f"file {doc['_id']!r} is incomplete", code=Code.FILE_NOT_FOUND)
        return b"".join(bytes(found[i]) for i in ids)

    @timed
    async def file_usage(self, owner):
        doc = await self.db.file_usage.find_one({"_id": owner})
        return doc["bytes"] if doc else 0

    @timed
    async def add_file_usage(self, owner, size):
        await self.db.file_usage.update_one({"_id": owner}, {"$inc": {"bytes": size, "files": 1}}, upsert=True)

    @timed
    async def add_file_refs(self, keys, session_id):
        """The session's messages show these files: its members may read them."""
        await self.files.update_many({"_id": {"$in": list(keys)}}, {"$addToSet": {"sessions": session_id}})

    @timed
    async def is_member_of_any(self, session_ids, user):
        return await self.sessions.find_one({"_id": {"$in": list(session_ids)}, "members": {"$in": [user]}},
                                            {"_id": 1}) is not None



def write_error(exc, error):
    """One failed write of a bulk as the error its caller expects: a duplicate key as DuplicateKeyError (so an
    idempotent send's race never reads as a store fault), anything else as a WriteError (store_unavailable)."""
    if error is None:
        return exc
    if error.get("code") == 11000:
        return DuplicateKeyError(error.get("errmsg", "duplicate key"), 11000, error)
    return WriteError(error.get("errmsg", "write failed"), error.get("code"), error)
