"""Writes under bursts: group commit (single-document writes issued together go to the store as one bulk
write) and admission (a burst of sends waits its turn for the store instead of timing out in the driver).

A burst (1,000 sends at once, 1,000 replies checkpointing every second) is thousands of one-document writes;
nx-27017 (and, less so, MongoDB) does far more of them per second as one bulk call than as single calls. A
`GroupCommit` gathers what callers submit in the same loop turn, and everything submitted while its previous
bulk is in flight, into the next bulk: a lone write goes out at once (one loop turn later), and under load
the batches grow by themselves as the store slows down, instead of a backlog of single calls that time out.
"""
import asyncio
import collections
import contextlib
import logging
import time

from pymongo.errors import PyMongoError

from services.wire.codes import Code
from services.wire.errors import Overloaded, Unavailable

log = logging.getLogger(__name__)


class GroupCommit:
    """`await submit(item)` -> this item's result of `flush(items)`, which writes a batch and returns one result
    per item (or an exception instance for an item that failed alone); if `flush` raises, every item of its
    batch gets that error. At most `max_batch` items per flush, in submission order."""

    def __init__(self, flush, *, max_batch=500, on_batch=None):
        self._flush = flush
        self.max_batch = max_batch
        self._on_batch = on_batch  # callable(size): a metric
        self._pending = []         # (item, future)
        self._worker = None

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._drain(), name="group-commit")
        return await future

    async def _drain(self):
        batch = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:  # the store failed: every caller of this batch gets the error
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller went away; the write happened anyway
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        finally:
            self._worker = None
            if batch:  # cancelled mid-flush (loop shutdown): nothing will answer these callers
                for _, future in batch + self._pending:
                    future.cancel()
                self._pending = []

    async def close(self):
        """Let the writes already submitted land."""
        while self._worker is not None:
            await asyncio.shield(self._worker)


class Admission:
    """At most `limit` callers inside at once (sends writing to the store); up to `queue` more wait their turn in
    arrival order, and beyond that `overloaded`. Without it a burst of sends is a burst of store operations
    whose time limit (--store-timeout) runs while they queue in the driver: nx-27017 falls behind by more than
    that and they fail with `store_unavailable` though the store is working. A waiter gives up with
    `store_unavailable` only when no caller inside succeeded for `stall` seconds since it began to wait: the
    store is not moving, rather than busy."""

    def __init__(self, limit, queue, stall):
        self.limit, self.queue, self.stall = limit, queue, stall
        self.inside = 0
        self._waiters = collections.deque()  # futures, in arrival order; a result hands over a place inside
        self._progress = time.monotonic()    # when a caller inside last finished with an answer from the store

    @property
    def waiting(self):
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self):
        await self._enter()
        ok = False
        try:
            yield
            ok = True
        except PyMongoError:
            raise
        except Exception:
            ok = True  # an answer (a duplicate, not found, a refusal): the store is moving
            raise
        finally:
            self._leave(ok)

    async def _enter(self):
        if self.inside < self.limit and not self._waiters:
            self.inside += 1
            return
        if len(self._waiters) >= self.queue:
            raise Overloaded(f"more than {self.queue} messages are waiting for the message store; try again",
                             code=Code.OVERLOADED)
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        started = time.monotonic()
        try:
            while not future.done():
                remaining = max(self._progress, started) + self.stall - time.monotonic()
                if remaining <= 0:
                    raise Unavailable("the message store is unavailable, try again")
                await asyncio.wait((future,), timeout=remaining)
        except BaseException:
            if future.done() and not future.cancelled():
                self._leave(False)  # handed a place just now: pass it on
            else:
                future.cancel()
                self._waiters.remove(future)
            raise

    def _leave(self, ok):
        if ok:
            self._progress = time.monotonic()
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # its place inside: `inside` stays the same
                return
        self.inside -= 1
