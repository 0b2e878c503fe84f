"""Sessions and their membership: opening one (a LangBot-style default, a widget's, a named one), who may use it,
who is in it, its title, the list of a user's sessions.

Every operation takes the caller's Identity and checks access here, once, for both transports. The validator
of session types lives here, beside the only code that reads them into a query (an id's is the wire's:
schema.check_id).
"""
import asyncio
import hashlib

from services.storage import paging

from services.storage.store import session_position
from services.wire import events, schema
from services.wire.codes import Code
from services.wire.errors import BadRequest, Forbidden, NotFound
from services.wire.schema import check_id

SESSION_TYPES = ("person", "group")
MAX_MEMBERS = 256        # default of --max-members: a session document stays small (256 ids of <= 128 chars)
MAX_TITLE = schema.MAX_TITLE
KNOWN_SESSIONS = 10_000  # sessions whose id, pipeline and type are kept in memory for sends

def check_session_type(value):
    if value not in SESSION_TYPES:
        raise BadRequest(f"session_type must be one of {', '.join(SESSION_TYPES)}", code=Code.INVALID_SESSION_TYPE)
    return value


def default_session_id(pipeline, session_type, user_id):
    """LangBot-style: one implicit session per pipeline, session type and user. Deterministic, so race-free."""
    digest = hashlib.sha256(f"{pipeline}\0{session_type}\0{user_id}".encode()).hexdigest()[:24]
    return f"d{digest}"



def can_access(identity, session):
    return identity.is_admin or identity.user_id in session.get("members", ())


class Sessions:
    def __init__(self, store, hub, bus, pipelines, numbers, *, max_members=MAX_MEMBERS):
        self.store = store
        self.hub = hub
        self.bus = bus
        self.pipelines = pipelines
        self.numbers = numbers    # services/conversations/numbers.py: a session document read here tells it the counter
        self.max_members = max_members
        self._known = {}          # session id -> its unchanging fields (session_to_send), the latest KNOWN_SESSIONS
        self._opening = {}        # default/embed session id -> the store lookup in flight (_get_or_create)

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
        self.numbers.seen(doc)

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
