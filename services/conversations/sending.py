"""Sending: a user's message stored and its reply accepted (send, regenerate), and replies stopped.

Every operation takes a session the caller was already let into (services/conversations/sessions.py). A send numbers its
two messages (services/conversations/numbers.py), stores them in one insert and, with no await in between, publishes the
user message and hands the reply to the stream manager (services/replies/streams.py), which owns it from then on.
"""
import asyncio
import logging

from pymongo.errors import DuplicateKeyError

from services.conversations.compose import MAX_IMAGE, compose
from services.delivery.ordering import SEQS_PER_SEND
from services.storage.store import new_id, reply_id_for, utcnow
from services.wire import events, frames, schema
from services.wire.codes import LIVE, Code
from services.wire.errors import Conflict, NotFound
from services.wire.schema import check_id

log = logging.getLogger(__name__)

AUTO_TITLE = 60          # characters of the first message that name an untitled session


def title_from(text, images=()):
    """What names an untitled session after its first message: its first line, shortened (or "Image")."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if len(line) > AUTO_TITLE:
        line = line[:AUTO_TITLE - 1].rstrip() + "…"
    return line or ("Image" if images else "Untitled")


class Sending:
    def __init__(self, store, hub, fanout, bus, streams, pipelines, numbers, *, files, limiter=None,
                 on_last_viewer_gone="continue", max_image_size=MAX_IMAGE, max_document_size=None, admission):
        self.files = files        # conversations/files.py: a chain's files are stored and checked before its message
        self.max_document_size = max_document_size
        self.limiter = limiter
        self.admission = admission  # services/storage/batching.py: --send-concurrency inside, --send-queue waiting
        self.max_image_size = max_image_size
        self.store = store
        self.hub = hub
        self.fanout = fanout
        self.bus = bus
        self.streams = streams
        self.pipelines = pipelines
        self.numbers = numbers    # message numbers without a store round trip (services/conversations/numbers.py)
        self.on_last_viewer_gone = on_last_viewer_gone  # "continue" | "stop"
        self._background = set()  # store writes nobody waits for (durable stops, counters), in flight

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
        async with self.admission.slot():  # a burst waits its turn here, not in the driver (storage/batching.py)
            return await self._send(identity, session, composed.text, images, composed.chain, stream,
                                    client_msg_id, connection_id)

    async def _send(self, identity, session, text, images, chain, stream, client_msg_id, connection_id):
        if client_msg_id is not None:
            existing = await self.store.find_by_client_msg_id(session["_id"], client_msg_id)
            if existing:
                return await self._duplicate(identity, session, existing, stream, connection_id)
        self.streams.check_capacity(session["_id"])
        await self.streams.check_shared_capacity(session["_id"], session["pipeline"])
        if self.limiter is not None:
            self.limiter.take(identity.user_id)
        # The reply is stored already claimed for streaming (one write less before its first token), and its
        # context read while its number is reserved, when it will start at once: nothing else of its session is
        # live or being sent here, and no other instance may claim its turn (not in cluster mode).
        sid, streams = session["_id"], self.streams
        claimed = not (streams.cluster or streams.live(sid) or self.numbers.sending(sid))
        self.numbers.send_began(sid)
        history = streams.prefetch_history(sid, session["pipeline"]) if claimed else None
        try:
            for retry in (False, True):
                user_doc, reply_doc = await self._store_send(identity, session, text, chain, client_msg_id, claimed)
                if user_doc is not None:
                    break
                if retry:  # numbered from the store this time: not a stale counter
                    raise DuplicateKeyError("a message number of this send is taken", 11000)
                # a number from memory was taken already (services/conversations/numbers.py): repair the
                # counter, reserve
                self.numbers.forget(sid)
                await self.store.repair_seq(sid)
            if reply_doc is None:  # the same client_msg_id landed first from another tab
                return await self._duplicate(identity, session, user_doc, stream, connection_id)
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
            self.numbers.send_ended(sid)

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
        reply_doc = {"_id": reply_id_for(user_doc["_id"]), "session_id": sid, "pipeline": pipeline,
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
        lands is repaired by the next send: services/conversations/numbers.py)."""
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
            self.numbers.send_began(sid)  # its number may move the counter: see Numbers.seen
            try:
                reply_doc = await self._store_regenerate(identity, session, question, reply_id)
            except BaseException:
                await asyncio.shield(self.store.unsupersede(message_id, reply_id))
                raise
            finally:
                self.numbers.send_ended(sid)
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
            # a number from memory was taken already (services/conversations/numbers.py): repair the counter, reserve
            self.numbers.forget(sid)
            await self.store.repair_seq(sid)
            reply_doc["seq"] = await self._reserve(sid, session["pipeline"],
                                                   None if identity.is_admin else identity.user_id, 1)
            await self._insert(sid, [reply_doc], False)
        return reply_doc

    async def _duplicate(self, identity, session, user_doc, stream, connection_id):
        """A repeat of a stored send: (user_doc, its reply, True). A send cut off between its two inserts (its
        instance stopped or died, or its reply's insert is still on its way) left the user message without a
        reply: the repeat stores it under the same derived id, so one of the two lands, and starts the one it
        stored."""
        reply_doc = await self.store.find_reply(user_doc["_id"])
        if reply_doc is None:
            reply_doc, stored_here = await self._store_missing_reply(identity, session, user_doc)
            if stored_here:
                pipeline = self.pipelines.get(session["pipeline"])
                text, images = await self.prompt_of(user_doc, pipeline)
                log.info("stored the missing reply message_id=%s of a repeated send", reply_doc["_id"])
                self.bus.publish(events.UserMessage(session_id=session["_id"], message=frames.message_data(user_doc),
                                                    session_type=session["type"], connection_id=connection_id))
                self.streams.accept(message_id=reply_doc["_id"], session=session, seq=reply_doc["seq"],
                                    reply_to=user_doc["_id"], prompt=text, sender=user_doc.get("sender"),
                                    stream=stream, images=images, epoch=0)
        return user_doc, reply_doc, True

    async def _store_missing_reply(self, identity, session, user_doc):
        """Insert the queued reply a stored user message lacks, numbered right after it as its send numbered it:
        (reply_doc, True); (the one stored meanwhile, False) if the send's own insert or another repeat's won."""
        sid, now = session["_id"], utcnow()
        reply_doc = {"_id": reply_id_for(user_doc["_id"]), "session_id": sid, "pipeline": session["pipeline"],
                     "seq": user_doc["seq"] + 1, "role": "assistant", "content": "", "thinking": "",
                     "status": "queued", "epoch": 0, "length": 0, "thinking_length": 0, "reply_to": user_doc["_id"],
                     "created_at": now, "updated_at": now, "instance": self.streams.instance_id,
                     "lease_until": self.streams.lease_until()}
        for renumber in (False, True):
            if renumber:  # its number went to a later message (a restart relearned the counter): the next one
                reply_doc["seq"] = await self._reserve(sid, session["pipeline"],
                                                       None if identity.is_admin else identity.user_id, 1)
            try:
                await self.store.insert_messages([reply_doc])
                return reply_doc, True
            except DuplicateKeyError:
                stored = await self.store.find_reply(user_doc["_id"])
                if stored is not None:
                    return stored, False
        raise DuplicateKeyError("the reply of a repeated send could not be numbered", 11000)

    def stop(self, identity, session_id, message_id=None):
        """Stop a reply (or every reply) of a session the caller was already allowed into.

        Synchronous, so a stop never waits behind anything. Stopping when nothing runs is a no-op: [].
        """
        if message_id is not None:
            check_id(message_id, "message_id")
        stopped = self.streams.stop(session_id, message_id)
        # the owner of a reply running elsewhere
        self.bus.publish(events.Stop(session_id=session_id, message_id=message_id))
        # A reply stopped here records the stop in its own terminal write (services/replies/streams.py): a write of
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


def discard(task):
    """Cancel a task nobody will await, and retrieve its outcome (no "exception never retrieved")."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
