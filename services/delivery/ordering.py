"""One order of a session's messages for every viewer, on every instance: the store's `seq`.

An instance delivers the events it publishes at once and other instances' through the change stream, so two user
messages of one session accepted at once on two instances can reach the viewers of a third in either order, and
even a single box can publish them out of order (two sends await their store writes side by side). The fan-out
passes each event through `Ordering` first.

`send()` reserves two consecutive numbers per message (the user message n, its reply n + 1: SEQS_PER_SEND), so
after the user message n the next is n + 2; `regenerate()` reserves one, announced by a `reply.regenerate` event
that opens it as a user message opens its pair. Per viewed session, `upto` is the highest number accounted for: a
user message n is delivered when n <= upto + 1, a reply's event when its number <= upto (its question was
delivered). Anything else is held, in arrival order, with whatever arrives after it for that session. After
GAP_WAIT the gap is filled from the store, the source of truth: a message found there is delivered from it (its
event, when it comes, is dropped); a number not there was never used (a send that failed after reserving it).
A session is tracked from its first viewer here (`track`, with the store's counter at join time) to its last.

A lost event shows as a gap only when a later one of its session arrives, which may be never (the session's last
message). So the numbers the store has reserved are also checked without waiting for a later event (`catch_up`,
run by a cluster bus): after a change stream was reopened (events may be lost) every tracked session is filled up
to its stored counter at once; otherwise every CATCH_UP interval, up to the counter seen at the previous check (a
number reserved that long ago whose event has not come is late or lost). A filled reply that has ended is
delivered as its stored final, one still generating as its start (its text follows from its owner); the reply's
own events, if they come after all, are dropped.
"""
import asyncio
import logging
import time

from services.wire import events, frames

log = logging.getLogger(__name__)

SEQS_PER_SEND = 2  # services/conversations/sending.py send(): the user message and its reply
GAP_WAIT = 1.0     # seconds a missing number may take to arrive before the store is asked
ORDERED = frozenset((events.UserMessage, events.ReplyRegenerate, events.ReplyStarted, events.ReplyDelta,
                     events.ReplyFinal))
# Events that take new numbers: a send's user message (it and its reply: SEQS_PER_SEND), a regenerated reply (one)
OPENS = {events.UserMessage: SEQS_PER_SEND, events.ReplyRegenerate: 1}
FILLED_REMEMBERED = 256
COUNTERS_BATCH = 500  # sessions per counter read of a catch-up


class Session:
    __slots__ = ("upto", "held", "timer", "filling", "filled", "seen")

    def __init__(self, upto):
        self.upto = upto
        self.held = []        # events waiting for a missing number, in arrival order
        self.timer = None
        self.filling = False
        self.filled = {}      # numbers delivered from the store -> "user" | "reply" (their late events are dropped)
        self.seen = upto      # the store's counter at the previous catch-up


def seq_of(event):
    return event.message["seq"] if type(event) is events.UserMessage else event.seq


class Ordering:
    def __init__(self, deliver, store=None, session_type=lambda session_id: "person"):
        self.deliver = deliver            # event -> None: the fan-out's rendering
        self.store = store                # to fill gaps; None: a gap is skipped after GAP_WAIT
        self.session_type = session_type
        self.sessions = {}                # session id -> Session, while it has a viewer here
        self._fills = set()
        self._catching_up = None          # the running catch-up task
        self._resync_again = False        # a reopen asked for one while another ran

    def track(self, session_id, upto):
        if session_id not in self.sessions and upto is not None:
            self.sessions[session_id] = Session(upto)

    def forget(self, session_id):
        """The last viewer here left: what is held goes out now (the fan-out still keeps reply state)."""
        state = self.sessions.pop(session_id, None)
        if state is not None:
            if state.timer is not None:
                state.timer.cancel()
            for event in state.held:
                self.deliver(event)

    def handle(self, event):
        state = self.sessions.get(event.session_id) if type(event) in ORDERED else None
        if state is None:
            self.deliver(event)
        elif not state.held and self._ready(state, event):
            self._pass(state, event)
        else:
            state.held.append(event)
            self._release(state)
            if state.held and state.timer is None and not state.filling:
                state.timer = asyncio.get_running_loop().call_later(GAP_WAIT, self._fill, event.session_id)

    def _ready(self, state, event):
        seq = seq_of(event)
        return seq <= state.upto + 1 if type(event) in OPENS else seq <= state.upto

    def _pass(self, state, event):
        if state.filled:
            seq = seq_of(event)
            if type(event) is events.UserMessage:
                if state.filled.pop(seq, None):
                    return  # already delivered from the store
            elif seq in state.filled:
                return  # the reply's final was delivered from the store
        if (opens := OPENS.get(type(event))) is not None:
            state.upto = max(state.upto, seq_of(event) + opens - 1)
        self.deliver(event)

    def _release(self, state):
        moved = True
        while moved and state.held:
            moved = False
            for i, event in enumerate(state.held):
                if self._ready(state, event):
                    del state.held[i]
                    self._pass(state, event)
                    moved = True
                    break

    def _needed(self, state):
        """The highest number that must be accounted for before everything held can go."""
        return max(seq_of(e) - 1 if type(e) in OPENS else seq_of(e) for e in state.held)

    def _fill(self, session_id):
        state = self.sessions.get(session_id)
        if state is None:
            return
        state.timer = None
        if not state.held or state.filling:
            return
        state.filling = True
        task = asyncio.get_running_loop().create_task(self._fill_from_store(session_id, state),
                                                      name=f"order-fill-{session_id}")
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill_from_store(self, session_id, state, needed=0):
        """Deliver from the store what numbers up to `needed` (and what the held events need) hold."""
        if state.held:
            needed = max(needed, self._needed(state))
        docs = []
        try:
            if self.store is not None and needed > state.upto:
                docs = await self.store.list_messages(session_id, after_seq=state.upto,
                                                      limit=min(needed - state.upto, 500))
        except Exception as exc:  # the store is away: give up waiting rather than hold the session
            log.warning("could not fill a message gap from the store session_id=%s: %s", session_id, exc)
        finally:
            state.filling = False
        if self.sessions.get(session_id) is not state:
            return  # forgotten meanwhile (everything held was delivered then)
        held = {seq_of(e) for e in state.held if type(e) is events.UserMessage}
        # replies whose own events reached us (held until now): those go out as they came, never from the store
        heard = {e.message_id for e in state.held if type(e) is not events.UserMessage}
        filled = set()  # the user messages delivered from the store just now
        for doc in docs:
            seq = doc["seq"]
            if seq > needed:
                continue
            if doc.get("role") != "user":
                if doc.get("reply_to") in filled and doc["_id"] not in heard:
                    self._fill_reply(state, doc)  # its question's event was lost: its own may be too
                continue
            if seq <= state.upto:
                continue
            state.upto = max(state.upto, seq - 1)  # the numbers before it that the store lacks were never used
            if seq in held:
                self._release(state)
                continue
            log.info("message seq=%s of session_id=%s delivered from the store (its event is late or lost)",
                     seq, session_id)
            self._remember(state, seq, "user")
            filled.add(doc["_id"])
            state.upto = max(state.upto, seq + SEQS_PER_SEND - 1)
            self.deliver(events.UserMessage(session_id=session_id, message=frames.message_data(doc),
                                            session_type=self.session_type(session_id), origin="store",
                                            at=time.time()))
            self._release(state)
        state.upto = max(state.upto, needed)
        self._release(state)
        if state.held and state.timer is None:  # a new gap behind the one just filled
            state.timer = asyncio.get_running_loop().call_later(GAP_WAIT, self._fill, session_id)

    @staticmethod
    def _remember(state, seq, kind):
        state.filled[seq] = kind
        if len(state.filled) > FILLED_REMEMBERED:
            del state.filled[next(iter(state.filled))]

    def _fill_reply(self, state, doc):
        """A reply whose question was delivered from the store, and none of whose events came: its stored state
        goes out now (its final if it ended; its text so far if it is generating, the owner's deltas follow; a
        queued one announces its own start later)."""
        if doc["status"] == "queued":
            return
        if doc["status"] not in ("streaming",):
            self._remember(state, doc["seq"], "reply")  # its late events, if any, are dropped
        log.info("reply seq=%s of session_id=%s delivered from the store (%s; its events are late or lost)",
                 doc["seq"], doc["session_id"], doc["status"])
        self.deliver(events.reply_stored(doc))

    def catch_up(self, resync=False):
        """Fill every tracked session up to the numbers the store has reserved: all of them after a change stream
        was reopened (`resync`), else those already reserved at the previous call. Never awaits."""
        if not self.sessions or self.store is None:
            return
        if self._catching_up is not None:
            self._resync_again = self._resync_again or resync
            return
        self._catching_up = asyncio.get_running_loop().create_task(self._catch_up(resync), name="order-catch-up")

    async def _catch_up(self, resync):
        try:
            while True:
                ids = list(self.sessions)
                for i in range(0, len(ids), COUNTERS_BATCH):
                    counters = await self.store.seq_counters(ids[i:i + COUNTERS_BATCH])
                    for session_id, counter in counters.items():
                        state = self.sessions.get(session_id)
                        if state is None or counter is None:
                            continue
                        target = counter if resync else min(counter, state.seen)
                        state.seen = counter
                        if target > state.upto and not state.filling:
                            state.filling = True
                            await self._fill_from_store(session_id, state, target)
                if not self._resync_again:
                    return
                self._resync_again, resync = False, True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store is away: the next call tries again
            log.warning("could not check the sessions' message numbers: %s", exc)
        finally:
            self._catching_up = None

    async def close(self):
        if self._catching_up is not None:
            self._catching_up.cancel()
            await asyncio.gather(self._catching_up, return_exceptions=True)
        for state in self.sessions.values():
            if state.timer is not None:
                state.timer.cancel()
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)
