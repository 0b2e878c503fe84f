"""Message numbers for sends, from memory where this instance alone numbers a session's messages.

Every message has a number (`seq`) from its session's counter in the store (`next_seq`, the last number
reserved); a send reserves two (its user message, its reply: services/delivery/ordering.py SEQS_PER_SEND), so counters
stay even and a number pair is never split. The reservation that is always right is one atomic write, which
also checks that the sender may write there (store.next_seqs): the messages' insert must wait for it, two store
round trips before a reply's first token.

Without --cluster this instance is the only writer of every counter, and a person session's only sender is its
owner (an admin aside), which never changes. For those sessions the numbers are taken from memory at once and
the counter is written after the messages' insert, in the background (store.advance_seq, `$max`): one
round trip before the reply starts, not two. The counter
is known from a reservation this instance made, or a session document read while no send of it was in flight
here; a number taken while a reservation of the same session is in flight could collide with it, so none is.
Whatever goes wrong anyway (a counter behind its messages after a crash before it was written, an entry
evicted and learned again late) fails the insert on the unique (session_id, seq) index, before anything was
shown: the send repairs the counter from the messages and reserves the usual way (services/conversations/sending.py).
"""

KNOWN = 10_000  # sessions whose counter is kept (the most recently learned)


class Numbers:
    def __init__(self, *, local, known=KNOWN):
        self.local = local      # False in cluster mode: every send reserves in the store
        self.known = known
        self._next = {}         # session id -> the first number not yet taken
        self._reserving = {}    # session id -> reservations in flight in the store (store.next_seqs)
        self._sending = {}      # session id -> sends between their first write and accept() (conversations/sending.py)

    def take(self, session, count, may_write):
        """The first of `count` numbers for a send into `session`, or None: reserve them in the store
        (`reserving`/`reserved` around it). `may_write`: the sender is the owner of a person session, or an
        admin (the check next_seqs would make)."""
        sid = session["_id"]
        if not (self.local and may_write and session.get("type") == "person") or self._reserving.get(sid):
            return None
        first = self._next.get(sid)
        if first is not None:
            self._next[sid] = first + count
        return first

    def reserving(self, session_id):
        self._reserving[session_id] = self._reserving.get(session_id, 0) + 1

    def reserved(self, session_id, counter):
        """A reservation in the store ended; `counter`: the session's counter it returned (None: it failed)."""
        if self._reserving[session_id] == 1:
            del self._reserving[session_id]
        else:
            self._reserving[session_id] -= 1
        if counter is not None:
            self.learn(session_id, counter)

    def send_began(self, session_id):
        self._sending[session_id] = self._sending.get(session_id, 0) + 1

    def send_ended(self, session_id):
        self._sending[session_id] -= 1
        if not self._sending[session_id]:
            del self._sending[session_id]

    def sending(self, session_id):
        """A send of the session is between its first write and accept() here."""
        return session_id in self._sending

    def seen(self, doc):
        """A session document read from the store. While a send of it is in flight here (`sending`), its
        reservation may already have moved the counter past what this read saw. The document's counter is raised
        to the numbers taken here (their counter write may not have landed): what joins the session from it (the
        fan-out's order, a session's `last_seq`) accounts for them, as it would with the store's own reservation."""
        if not (self.local and doc.get("type") == "person" and "next_seq" in doc):
            return
        if not self.sending(doc["_id"]):
            self.learn(doc["_id"], doc["next_seq"])
        first = self._next.get(doc["_id"])
        if first is not None and first - 1 > doc["next_seq"]:
            doc["next_seq"] = first - 1

    def learn(self, session_id, counter):
        if not self.local:
            return
        first = self._next.pop(session_id, None)  # (re)inserted last: the oldest goes first
        if len(self._next) >= self.known:
            del self._next[next(iter(self._next))]
        self._next[session_id] = max(counter + 1, first or 0)  # counters only grow: a late read never lowers it

    def forget(self, session_id):
        self._next.pop(session_id, None)
