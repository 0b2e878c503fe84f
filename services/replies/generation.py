"""One reply while it lives here: what it has said, where it stands in the store (its epoch, what is saved),
and the times the metrics read. Moved only by the task that runs it (services/replies/streams.py)."""
import asyncio
import time


class Generation:
    def __init__(self, *, message_id, session, seq, reply_to, prompt, sender, stream, images=(), epoch=0,
                 history=None, prompt_seq=None, continuation=None):
        self.message_id = message_id
        self.session_id = session["_id"]
        self.session_type = session["type"]
        self.pipeline_id = session["pipeline"]
        self.seq = seq
        self.reply_to = reply_to      # the user message id this answers
        # that message's number: the context is what came before it (a regenerated reply is numbered later)
        self.prompt_seq = seq - 1 if prompt_seq is None else prompt_seq
        self.prompt = prompt          # the user's text
        self.images = images          # image URLs (http(s) or data:) for pipelines with image input
        self.sender = sender
        self.stream = stream          # False: viewers get only the final frame
        self.status = "queued"
        self._content = []            # the answer's pieces, joined when read: `+=` per chunk copied the reply
        self.content_length = 0
        self.thinking = ""
        self.error = None             # {"code", "message"} when failed/timeout
        self.usage = None
        self.model = None
        self.stop_reason = None       # set once by stop(): the terminal status to end with
        self.task = None
        self.running = False          # the task has begun executing (cancelling before that skips its finally)
        self.done = asyncio.Event()   # set after the terminal state is persisted and sent
        self.previous = None          # the generation this one waits for (same session)
        self.checkpoint_task = None
        self.last_checkpoint = None   # the loop's clock at the latest checkpoint (at first: at the first chunk)
        self.dirty_since = None       # monotonic time of the oldest character not yet checkpointed
        self.epoch = epoch            # fencing token from the store's claim: every write of ours must match it
        self.bases = []               # [epoch, offset, thinking_offset] of every owner that took it over
        self.claimed = epoch > 0      # stored already streaming, with this epoch (conversations/sending.py send)
        self.history = history        # a task reading the context already (prefetch_history), or None
        self.saved = self.saved_thinking = 0  # characters of content/thinking already checkpointed
        self.fenced = False           # the store refused our write: another instance ended this reply
        self.has_turn = False         # cluster mode: holds its session's generation turn in the store
        self.turn_free = asyncio.Event()  # cluster mode: a reply of its session ended (claim the turn again)
        self.finishing = False        # _finish has begun: nothing may cancel the task any more
        # Taken over from a lost instance (services/cluster/failover.py): the stored text so far, and every
        # owner's start
        self.continuing = continuation is not None
        self.continuations = 0        # how many times it went on with another instance
        self.saved_from = 0           # characters of answer it was taken over with
        self.taken_over_at = None     # monotonic time another instance's reply was taken over here (metrics)
        if continuation is not None:
            self.add_content(continuation["content"])
            self.thinking = continuation["thinking"]
            self.saved, self.saved_thinking = self.content_length, len(self.thinking)
            self.bases = [list(b) for b in continuation["bases"]]
            self.continuations = continuation["continuations"]
            self.saved_from = self.content_length
        # monotonic times for metrics (services/operations/metrics.py)
        self.accepted_at = time.monotonic()
        # epoch seconds it started streaming (accepted, until then); a continuation's: when it was sent, as its
        # viewers anywhere since then may hold some of it (services/delivery/replylog.py)
        self.started_epoch = (continuation or {}).get("sent_at") or time.time()
        self.started_at = self.first_token_at = self.stop_requested_at = None

    @property
    def content(self):
        """The answer so far."""
        parts = self._content
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def add_content(self, text):
        if text:
            self._content.append(text)
            self.content_length += len(text)

    def heed_stop(self):
        """After awaiting the store: a stop that arrived meanwhile may have been swallowed by the driver's
        asyncio.wait_for (Python 3.11 returns a result that is ready instead of raising the cancellation); its
        reason is set all the same, so it ends the reply here."""
        if self.stop_reason:
            raise asyncio.CancelledError
