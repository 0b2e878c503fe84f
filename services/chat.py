"""Chat use cases shared by the WebSocket and REST handlers: sessions, send, stop, history, reset.

Every operation takes the caller's Identity and checks access here, once, for both transports.
"""
import asyncio
import hashlib
import logging

from pymongo.errors import DuplicateKeyError

from services import events, frames, paging, schema
from services.codes import LIVE, Code
from services.compose import MAX_IMAGE, compose
from services.numbers import Numbers
from services.ordering import SEQS_PER_SEND
from services.errors import BadRequest, Conflict, Forbidden, NotFound
from services.store import new_id, session_position, utcnow

log = logging.getLogger(__name__)

SESSION_TYPES = ("person", "group")
MAX_TEXT = schema.MAX_TEXT
MAX_MEMBERS = 256        # default of --max-members: a session document stays small (256 ids of <= 128 chars)
MAX_TITLE = schema.MAX_TITLE
AUTO_TITLE = 60          # characters of the first message that name an untitled session
MAX_VIEWED = 64          # sessions one connection may view at once (session.join)
KNOWN_SESSIONS = 10_000  # sessions whose id, pipeline and type are kept in memory for sends


def check_session_type(value):
    if value not in SESSION_TYPES:
        raise BadRequest(f"session_type must be one of {', '.join(SESSION_TYPES)}", code=Code.INVALID_SESSION_TYPE)
    return value


def check_id(value, what):
    """Ids are plain strings: anything else (an object such as {"$ne": ...}) never reaches a query."""
    if not isinstance(value, str) or not value or len(value) > 128:
        raise BadRequest(f"{what} must be a non-empty string of at most 128 characters", code=Code.INVALID_PARAM)
    return value


def title_from(text, images=()):
    """What names an untitled session after its first message: its first line, shortened (or "Image")."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if len(line) > AUTO_TITLE:
        line = line[:AUTO_TITLE - 1].rstrip() + "…"
    return line or ("Image" if images else "Untitled")


def default_session_id(pipeline, session_type, user_id):
    """LangBot-style: one implicit session per pipeline, session type and user. Deterministic, so race-free."""
    digest = hashlib.sha256(f"{pipeline}\0{session_type}\0{user_id}".encode()).hexdigest()[:24]
    return f"d{digest}"


class ChatService:
    def __init__(self, store, hub, fanout, bus, streams, pipelines, *, files, limiter=None,
                 on_last_viewer_gone="continue", max_members=MAX_MEMBERS, max_image_size=MAX_IMAGE,
                 max_document_size=None, admission):
        self.files = files        # services/files.py: a chain's files are stored and checked before its message
        self.max_document_size = max_document_size
        self.limiter = limiter
        self.admission = admission  # services/batching.py: --send-concurrency inside, --send-queue waiting
        self.max_image_size = max_image_size
        self.max_members = max_members
        self.store = store
        self.hub = hub
        self.fanout = fanout
        self.bus = bus
        self.streams = streams
        self.pipelines = pipelines
        self.on_last_viewer_gone = on_last_viewer_gone  # "continue" | "stop"
        self._background = set()  # store writes nobody waits for (durable stops, counters), in flight
        self._known = {}          # session id -> its unchanging fields (session_to_send), the latest KNOWN_SESSIONS
        self._opening = {}        # default/embed session id -> the store lookup in flight (_get_or_create)
        self._sending = {}        # session id -> sends between their first write and accept() (see send)
        self.numbers = Numbers(local=not streams.cluster)  # message numbers without a store round trip

    # sessions

    async def default_session(self, identity, pipeline_id, session_type, *, viewed_ok=False):
        """`viewed_ok`: a stand-in {_id, type} will do when a connection here views the session already (see
        _viewed)."""
        self.pipelines.get(pipeline_id)
        check_session_type(session_type)
        session_id = default_session_id(pipeline_id, session_type, identity.user_id)
        if viewed_ok and (viewed := self._viewed(session_id, session_type)):
            return viewed
        return await self._get_or_create(session_id, pipeline_id, session_type, identity.user_id)

    async def embed_session(self, identity, pipeline_id, session_type, client_session, *, viewed_ok=False,
                            create=True, admit=None):
        """A widget's conversation: one session per pipeline, session type, user (a visitor) and `client_session`.
        `create=False`: None when there is none yet (reading never creates one); `admit()`: awaited before one is
        created (a visitor's limits)."""
        check_id(client_session, "session_id")
        self.pipelines.get(pipeline_id)
        check_session_type(session_type)
        session_id = default_session_id(pipeline_id, session_type, f"{identity.user_id}\0embed\0{client_session}")
        if viewed_ok and (viewed := self._viewed(session_id, session_type)):
            return viewed
        if not create or admit is not None:
            doc = await self.store.find_session(session_id)
            if doc is not None:
                self._remember(doc)
                return dict(doc)
            if not create:
                return None
            await admit()
        return await self._get_or_create(session_id, pipeline_id, session_type, identity.user_id,
                                         visitor=identity.visitor)

    async def _get_or_create(self, session_id, pipeline_id, session_type, owner, visitor=""):
        """Callers that arrive together for one session (a burst of reconnects after a restart, a user's tabs)
        share one store lookup instead of each reading, racing to insert and reading again."""
        pending = self._opening.get(session_id)
        if pending is None:
            pending = asyncio.ensure_future(self.store.get_or_create_session(
                session_id=session_id, pipeline=pipeline_id, session_type=session_type, owner=owner,
                visitor=visitor))
            self._opening[session_id] = pending
            pending.add_done_callback(lambda f: self._opened(session_id, f))
        doc = await asyncio.shield(pending)  # one caller going away does not cancel the others' lookup
        self._remember(doc)
        return dict(doc)

    def _opened(self, session_id, future):
        if self._opening.get(session_id) is future:
            del self._opening[session_id]
        if not future.cancelled():
            future.exception()  # retrieved here too: every caller may have gone

    def viewed_default_session(self, identity, pipeline_id, session_type, client_session=None):
        """default_session (embed_session with `client_session`) without waiting: the stand-in when a connection
        here views it already (see _viewed), else None. Raises what they raise for bad arguments."""
        self.pipelines.get(pipeline_id)
        check_session_type(session_type)
        user = identity.user_id
        if client_session is not None:
            check_id(client_session, "session_id")
            user = f"{user}\0embed\0{client_session}"
        return self._viewed(default_session_id(pipeline_id, session_type, user), session_type)

    def _viewed(self, session_id, session_type):
        """A user's own default (or embed) session that a connection here views already needs no store round
        trip to connect another: it exists (its first viewer here made or read it; sessions are never deleted),
        its type and owner are in its id, and the fan-out has tracked its order since that first viewer."""
        if session_id in self.hub.by_session:
            return {"_id": session_id, "type": session_type}
        return None

    async def create_session(self, identity, pipeline_id, *, session_type="person", title="", members=()):
        self.pipelines.get(pipeline_id)
        check_session_type(session_type)
        if not isinstance(title, str) or len(title) > MAX_TITLE:
            raise BadRequest(f"title must be a string of at most {MAX_TITLE} characters", code=Code.INVALID_PARAM)
        if not isinstance(members, (list, tuple)):
            raise BadRequest("members must be a list of user ids", code=Code.INVALID_PARAM)
        if len(members) > self.max_members:
            raise BadRequest(f"members must be a list of at most {self.max_members} user ids",
                             code=Code.TOO_MANY_MEMBERS)
        members = [check_id(m, "a member") for m in members]
        if len({identity.user_id, *members}) > self.max_members:
            raise BadRequest(f"a session has at most {self.max_members} members", code=Code.TOO_MANY_MEMBERS)
        if session_type == "person" and set(members) - {identity.user_id}:
            raise BadRequest("a person session has only its owner; use session_type group", code=Code.INVALID_PARAM)
        return await self.store.create_session(pipeline=pipeline_id, session_type=session_type,
                                               owner=identity.user_id, members=members, title=title)

    async def session(self, identity, pipeline_id, session_id):
        """The session, if it exists in this pipeline and the caller may use it (else session_not_found)."""
        self.pipelines.get(pipeline_id)
        doc = await self.store.get_session(check_id(session_id, "session_id"))
        if doc["pipeline"] != pipeline_id or not can_access(identity, doc):
            raise NotFound(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
        self._remember(doc)
        return doc

    async def session_to_send(self, identity, pipeline_id, session_id):
        """What send() needs of a session (id, pipeline, type: none of them ever changes), from memory when this
        instance has seen it; send() checks access again in its own first write (`next_seqs`)."""
        known = self._known.get(session_id)
        if known is not None and known["pipeline"] == pipeline_id:
            return known
        return await self.session(identity, pipeline_id, session_id)

    def _remember(self, doc):
        if doc["_id"] not in self._known:
            if len(self._known) >= KNOWN_SESSIONS:
                del self._known[next(iter(self._known))]
            self._known[doc["_id"]] = {"_id": doc["_id"], "pipeline": doc["pipeline"], "type": doc["type"],
                                       "owner": doc.get("owner")}
        self.numbers.seen(doc, bool(self._sending.get(doc["_id"])))

    async def change_members(self, identity, session, *, add=(), remove=()):
        """Owner (or admin) adds or removes members of a group session; removed members stop viewing it."""
        if not (identity.is_admin or identity.user_id == session["owner"]):
            raise Forbidden("only the session's owner may change its members")
        if session["type"] != "group":
            raise BadRequest("only group sessions have members to change", code=Code.INVALID_PARAM)
        for ids in (add, remove):
            if not isinstance(ids, list) or len(ids) > schema.MAX_IDS:
                raise BadRequest(f"add and remove must be lists of at most {schema.MAX_IDS} user ids",
                                 code=Code.INVALID_PARAM)
        add, remove = [check_id(u, "a member") for u in add], [check_id(u, "a member") for u in remove]
        if session["owner"] in remove:
            raise BadRequest("the owner cannot be removed", code=Code.INVALID_PARAM)
        if len((set(session.get("members", ())) | set(add)) - set(remove)) > self.max_members:
            raise BadRequest(f"a session has at most {self.max_members} members (--max-members)",
                             code=Code.TOO_MANY_MEMBERS)
        doc = await self.store.change_members(session["_id"], add=add, remove=remove)
        # removed members stop viewing it; the others are told who is in it now
        self.bus.publish(events.Members(session_id=session["_id"], added=list(add), removed=list(remove),
                                        members=list(doc.get("members", ())), by=identity.user_id))
        return doc

    async def leave_group(self, identity, session):
        """A member leaves a group session (the owner cannot: the group would have nobody to manage it)."""
        if session["type"] != "group":
            raise BadRequest("only a group session can be left", code=Code.INVALID_PARAM)
        if identity.user_id == session["owner"]:
            raise BadRequest("the owner cannot leave their group", code=Code.INVALID_PARAM)
        doc = await self.store.change_members(session["_id"], remove=[identity.user_id])
        # their connections viewing it (on every instance) stop, told `session.left` reason left_group
        self.bus.publish(events.Members(session_id=session["_id"], added=[], removed=[identity.user_id],
                                        members=list(doc.get("members", ())), by=identity.user_id,
                                        reason="left_group"))
        return doc

    async def rename(self, identity, session, title):
        """Owner (or admin) sets a session's title (the web app's Rename)."""
        if not (identity.is_admin or identity.user_id == session["owner"]):
            raise Forbidden("only the session's owner may rename it")
        if not isinstance(title, str) or len(title) > MAX_TITLE:
            raise BadRequest(f"title must be a string of at most {MAX_TITLE} characters", code=Code.INVALID_PARAM)
        return await self.store.set_title(session["_id"], title.strip())

    async def list_sessions(self, identity, pipeline_id, *, limit=100, cursor=None):
        """One page of the user's sessions, most recently updated first: (docs, next_cursor)."""
        self.pipelines.get(pipeline_id)
        kind = f"sessions:{pipeline_id}"
        position = paging.decode(kind, cursor)
        before = None
        if position is not None:
            if not (isinstance(position, list) and len(position) == 2 and type(position[0]) is int
                    and isinstance(position[1], str)):
                raise BadRequest("cursor is not one this server gave out", code=Code.INVALID_CURSOR)
            before = tuple(position)
        docs = await self.store.list_sessions(pipeline=pipeline_id, user=identity.user_id, limit=limit + 1,
                                              before=before)
        return paging.page(docs, limit, kind, lambda d: list(session_position(d)))

    # messages

    async def send(self, identity, session, chain, *, stream=True, client_msg_id=None, connection_id=""):
        """Persist the user's message and accept a reply. Returns (user_doc, reply_doc, duplicate).
        `connection_id`: the sending WebSocket's (LangBot's echo names it), "" over REST."""
        pipeline = self.pipelines.get(session["pipeline"])
        composed = compose(chain, pipeline, max_image=self.max_image_size, max_document=self.max_document_size)
        images = ()
        if composed.attachments:  # stored (or checked) and readable by the session's members before it is
            await self.files.ingest(identity, composed.attachments)
            await self.files.reference(composed.attachments, session["_id"])
        if composed.images:
            images = await self.files.for_model(composed.images, pipeline)
        async with self.admission.slot():  # a burst waits its turn here, not in the driver (services/batching.py)
            return await self._send(identity, session, composed.text, images, composed.chain, stream,
                                    client_msg_id, connection_id)

    async def _send(self, identity, session, text, images, chain, stream, client_msg_id, connection_id):
        if client_msg_id is not None:
            existing = await self.store.find_by_client_msg_id(session["_id"], client_msg_id)
            if existing:
                return await self._duplicate(existing)
        self.streams.check_capacity(session["_id"])
        await self.streams.check_shared_capacity(session["_id"], session["pipeline"])
        if self.limiter is not None:
            self.limiter.take(identity.user_id)
        # The reply is stored already claimed for streaming (one write less before its first token), and its
        # context read while its number is reserved, when it will start at once: nothing else of its session is
        # live or being sent here, and no other instance may claim its turn (not in cluster mode).
        sid, streams = session["_id"], self.streams
        claimed = not (streams.cluster or streams.by_session.get(sid) or self._sending.get(sid))
        self._sending[sid] = self._sending.get(sid, 0) + 1
        history = streams.prefetch_history(sid, session["pipeline"]) if claimed else None
        try:
            for retry in (False, True):
                user_doc, reply_doc = await self._store_send(identity, session, text, chain, client_msg_id, claimed)
                if user_doc is not None:
                    break
                if retry:  # numbered from the store this time: not a stale counter
                    raise DuplicateKeyError("a message number of this send is taken", 11000)
                # a number from memory was taken already (services/numbers.py): repair the counter, reserve
                self.numbers.forget(sid)
                await self.store.repair_seq(sid)
            if reply_doc is None:  # the same client_msg_id landed first from another tab
                return await self._duplicate(user_doc)
            # No await between here and accept(): the reply is registered before anything else runs.
            self.bus.publish(events.UserMessage(session_id=sid, message=frames.message_data(user_doc),
                                                session_type=session["type"], connection_id=connection_id))
            streams.accept(message_id=reply_doc["_id"], session=session, seq=reply_doc["seq"],
                           reply_to=user_doc["_id"], prompt=text, sender=identity.user_id, stream=stream,
                           images=tuple(images), epoch=reply_doc["epoch"], history=history)
            history = None  # the generation owns it now
            if user_doc["seq"] == 1:  # a session's first message names it, for every client alike
                self._in_background(self._name(sid, title_from(text, images)), f"title-{sid}")
            return user_doc, reply_doc, False
        finally:
            if history is not None:
                discard(history)
            self._sending[sid] -= 1
            if not self._sending[sid]:
                del self._sending[sid]

    async def _store_send(self, identity, session, text, chain, client_msg_id, claimed):
        """Number and insert a send's two messages: (user_doc, reply_doc); (existing user doc, None) when its
        client_msg_id is stored already; (None, None) when a number taken from memory was in use."""
        sid, pipeline = session["_id"], session["pipeline"]
        may_write = identity.is_admin or identity.user_id == session.get("owner")
        seq = self.numbers.take(session, SEQS_PER_SEND, may_write)
        local = seq is not None
        if not local:
            seq = await self._reserve(sid, pipeline, None if identity.is_admin else identity.user_id)
        now = utcnow()
        user_doc = {"_id": new_id(), "session_id": sid, "pipeline": pipeline, "seq": seq,
                    "role": "user", "content": text, "chain": chain, "status": "completed",
                    "sender": identity.user_id, "created_at": now, "updated_at": now}
        if client_msg_id is not None:
            user_doc["client_msg_id"] = client_msg_id
        reply_doc = {"_id": new_id(), "session_id": sid, "pipeline": pipeline,
                     "seq": seq + 1, "role": "assistant", "content": "", "thinking": "", "status": "queued",
                     "epoch": 0, "length": 0, "thinking_length": 0,
                     "reply_to": user_doc["_id"], "created_at": now, "updated_at": now,
                     # leased from the start: a queued reply of a crashed instance is reaped too
                     "instance": self.streams.instance_id, "lease_until": self.streams.lease_until()}
        if claimed:  # as store.mark_streaming leaves it
            reply_doc.update(status="streaming", epoch=1, text_parts=[], thinking_parts=[], started_at=now)
        try:
            await self._insert(sid, [user_doc, reply_doc], local)
        except DuplicateKeyError:
            if client_msg_id is not None:  # the same client_msg_id raced in from another tab
                existing = await self.store.find_by_client_msg_id(sid, client_msg_id)
                if existing is not None:
                    return existing, None
            if not local:
                raise
            return None, None
        return user_doc, reply_doc

    async def _reserve(self, session_id, pipeline, member, count=SEQS_PER_SEND):
        """Reserve a send's numbers in the store (the access check in the same write)."""
        self.numbers.reserving(session_id)
        counter = None
        try:
            seq = await self.store.next_seqs(session_id, count, pipeline=pipeline, member=member)
            counter = seq + count - 1
            return seq
        finally:
            self.numbers.reserved(session_id, counter)

    async def _insert(self, session_id, docs, local):
        """Insert a send's messages. Numbers taken from memory have their counter written after the insert, in
        the background: the reply need not wait for it (memory has it right; a counter lost to a crash before it
        lands is repaired by the next send: services/numbers.py)."""
        await self.store.insert_messages(docs)
        if local:
            self._in_background(self._advance(session_id, docs[-1]["seq"]), f"counter-{session_id}")

    async def _name(self, session_id, title):
        try:
            await self.store.name_untitled(session_id, title)
        except Exception as exc:  # cosmetic: the session keeps its date as its name
            log.warning("could not name session_id=%s: %s", session_id, exc)

    async def _advance(self, session_id, counter):
        try:
            await self.store.advance_seq(session_id, counter)
        except Exception as exc:  # the next send's write, or a repair, sets it
            log.warning("could not write the message counter session_id=%s: %s", session_id, exc)

    async def regenerate(self, identity, session, message_id, *, stream=True):
        """A new reply to the user message that reply `message_id` answered, which it replaces: the session's
        latest message, ended. The earlier reply stays in the history (`superseded_by` names the new one) and
        leaves the model's context; the new one is numbered after it and answers from the context that came
        before the question. Returns (user_doc, reply_doc), as a send does."""
        check_id(message_id, "message_id")
        sid = session["_id"]
        old = await self.store.find_message(message_id)
        if old is None or old["session_id"] != sid or old.get("role") != "assistant":
            raise NotFound(f"no reply {message_id!r} in this session", code=Code.MESSAGE_NOT_FOUND)
        if old["status"] in LIVE:
            raise Conflict("this reply is still being written: stop it first", code=Code.REPLY_LIVE)
        last = await self.store.last_message(sid)
        if last is None or last["_id"] != message_id or old.get("superseded_by"):
            raise Conflict("only the session's latest reply can be regenerated", code=Code.NOT_LATEST_REPLY)
        question = await self.store.find_message(old.get("reply_to"))
        if question is None:
            raise NotFound("the message this reply answered is gone", code=Code.MESSAGE_NOT_FOUND)
        pipeline = self.pipelines.get(session["pipeline"])
        text, images = await self.prompt_of(question, pipeline, identity)
        self.streams.check_capacity(sid)
        await self.streams.check_shared_capacity(sid, session["pipeline"])
        if self.limiter is not None:
            self.limiter.take(identity.user_id)
        async with self.admission.slot():
            reply_id = new_id()
            if not await self.store.supersede(message_id, reply_id):  # a regenerate of it won already
                raise Conflict("only the session's latest reply can be regenerated", code=Code.NOT_LATEST_REPLY)
            self._sending[sid] = self._sending.get(sid, 0) + 1  # its number may move the counter: see _remember
            try:
                reply_doc = await self._store_regenerate(identity, session, question, reply_id)
            except BaseException:
                await asyncio.shield(self.store.unsupersede(message_id, reply_id))
                raise
            finally:
                self._sending[sid] -= 1
                if not self._sending[sid]:
                    del self._sending[sid]
        self.bus.publish(events.ReplyRegenerate(session_id=sid, seq=reply_doc["seq"], message_id=reply_id,
                                                reply_to=question["_id"], replaces=message_id))
        self.streams.accept(message_id=reply_id, session=session, seq=reply_doc["seq"], reply_to=question["_id"],
                            prompt=text, sender=question.get("sender") or identity.user_id, stream=stream,
                            images=tuple(images), epoch=0, prompt_seq=question["seq"])
        return question, reply_doc

    async def prompt_of(self, question, pipeline, identity=None):
        """A stored question as the model gets it again (a regenerated reply; a reply another instance goes on
        with): its text and its images. `identity`: whose inline files to store first (a regenerate)."""
        chain = schema.decode_chain(question.get("chain") or frames.chain(question.get("content", "")))
        composed = compose(chain, pipeline, max_image=self.max_image_size, max_document=self.max_document_size)
        if composed.attachments and identity is not None:  # the question's stored files, for the model again
            await self.files.ingest(identity, composed.attachments)
        images = await self.files.for_model(composed.images, pipeline) if composed.images else ()
        return composed.text, tuple(images)

    async def _store_regenerate(self, identity, session, question, reply_id):
        """Number (one number) and insert a regenerated reply, queued."""
        sid = session["_id"]
        may_write = identity.is_admin or identity.user_id == session.get("owner")
        seq = self.numbers.take(session, 1, may_write)
        local = seq is not None
        if not local:
            seq = await self._reserve(sid, session["pipeline"], None if identity.is_admin else identity.user_id, 1)
        now = utcnow()
        reply_doc = {"_id": reply_id, "session_id": sid, "pipeline": session["pipeline"], "seq": seq,
                     "role": "assistant", "content": "", "thinking": "", "status": "queued", "epoch": 0,
                     "length": 0, "thinking_length": 0, "reply_to": question["_id"], "created_at": now,
                     "updated_at": now, "instance": self.streams.instance_id,
                     "lease_until": self.streams.lease_until()}
        try:
            await self._insert(sid, [reply_doc], local)
        except DuplicateKeyError:
            if not local:
                raise
            # a number from memory was taken already (services/numbers.py): repair the counter, reserve
            self.numbers.forget(sid)
            await self.store.repair_seq(sid)
            reply_doc["seq"] = await self._reserve(sid, session["pipeline"],
                                                   None if identity.is_admin else identity.user_id, 1)
            await self._insert(sid, [reply_doc], False)
        return reply_doc

    async def _duplicate(self, user_doc):
        return user_doc, await self.store.find_reply(user_doc["_id"]), True

    def stop(self, identity, session_id, message_id=None):
        """Stop a reply (or every reply) of a session the caller was already allowed into.

        Synchronous, so a stop never waits behind anything. Stopping when nothing runs is a no-op: [].
        """
        if message_id is not None:
            check_id(message_id, "message_id")
        stopped = self.streams.stop(session_id, message_id)
        # the owner of a reply running elsewhere
        self.bus.publish(events.Stop(session_id=session_id, message_id=message_id))
        # A reply stopped here records the stop in its own terminal write (services/streams.py): a write of
        # the flag beside it would only queue in the store ahead of that write, which the final waits for.
        if message_id is None and self.streams.cluster:
            self._record_stop(session_id, None)  # the session's live replies on every instance
        elif message_id is not None and not stopped:
            self._record_stop(session_id, [message_id])  # running on another instance (or already ended)
        return stopped

    def _record_stop(self, session_id, message_ids):
        """Make a stop of a reply generating elsewhere durable in the background: its generation re-checks the
        flag when it starts and at every checkpoint, so the stop holds even if the `stop` event is lost."""
        if message_ids is not None and not message_ids:
            return
        self._in_background(self._write_stop(session_id, message_ids), f"stop-{session_id}")

    def _in_background(self, write, name):
        """A store write nobody waits for; close() lets it land."""
        task = asyncio.get_running_loop().create_task(write, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_stop(self, session_id, message_ids):
        try:
            if message_ids is None:
                await self.store.request_session_stop(session_id)
            else:
                await self.store.request_stop(session_id, message_ids)
        except Exception as exc:  # the local signal already did the work; this is the safety net
            log.warning("could not record stop session_id=%s message_ids=%s: %s", session_id, message_ids, exc)

    async def close(self):
        """Let the background writes in flight land before the store closes."""
        await asyncio.gather(*self._background, return_exceptions=True)

    def disconnect(self, conn):
        """A socket closed. Its replies go on (they belong to the session) unless configured to stop when
        the last viewer of a session is gone."""
        sessions = set(conn.sessions)
        self.fanout.unregister(conn)
        if self.on_last_viewer_gone != "stop":
            return
        for session_id in sessions:
            if not self.hub.viewers(session_id) and self.streams.live(session_id):
                log.info("last viewer gone, stopping replies session_id=%s", session_id)
                self.stop(conn.identity, session_id)

    # announcements (the callers check the caller is an admin)

    def broadcast(self, message, pipeline=None):
        """To every connection of a pipeline (None: of all). Returns how many connections here it reaches."""
        delivered = sum(not c.closed for c in self.hub.of_pipeline(pipeline))
        self.bus.publish(events.Broadcast(message=message, pipeline=pipeline))
        return delivered

    def push(self, user_id, message, data=None):
        """To every connection (tab, device) of one user. Returns how many connections here it reaches."""
        delivered = sum(not c.closed for c in self.hub.of_user(user_id))
        self.bus.publish(events.Push(user_id=user_id, message=message, data=data))
        return delivered

    async def history(self, identity, session, *, after_seq=0, limit=50):
        return await self.store.list_messages(session["_id"], after_seq=after_seq, limit=limit)

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
        for message_id in stopped:
            gen = self.streams.generations.get(message_id)
            if gen is not None:
                await gen.done.wait()
        deleted = await self.store.delete_session_messages(session["_id"])
        self.bus.publish(events.Reset(session_id=session["_id"], deleted=deleted))
        return {"stopped": stopped, "deleted": deleted}


def discard(task):
    """Cancel a task nobody will await, and retrieve its outcome (no "exception never retrieved")."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def can_access(identity, session):
    return identity.is_admin or identity.user_id in session.get("members", ())
