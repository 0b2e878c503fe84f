"""A connection's bounded send queue: one slow reader never grows memory without bound or delays anyone else.

A frame goes straight to the socket when nothing is in flight (no write of this connection whose future Tornado
has not resolved yet). While a write is in flight the socket is busy: frames wait here, and chunks of one reply
that wait together are merged — offsets make that safe: a merged delta starts at the first one's offset, a
merged cumulative frame is simply the newest; never across a final, `rewind` or `resumed` of their reply
queued between them (the later text would arrive before the frame that takes text back). When the write completes, what waits goes out (as long as less
than WINDOW characters are in flight). So a reply that streams faster than one write per loop turn goes out in
fewer, larger frames, and a frame that finds the socket idle goes out at once. Terminal frames and everything
else are never dropped or merged. If what waits still exceeds `limit` characters, the connection is too slow to
keep: `on_overflow()` closes it. A reply's final frame is not counted (it comes once per reply, is never
dropped, and of a huge reply is bigger than the limit by itself), and a paged catch-up (`put_pages`) makes its
next frame only when the socket has room, so it never waits here whole.

Frames are services/wire/schema.py's Structs. The fan-out encodes a frame once for every connection that gets the same
bytes: `put(frame, text, nbytes)` takes that text as is. Such a frame may be shared with other connections'
outboxes, so a merge copies it (and its data) first.
"""
from collections import deque

import msgspec
from msgspec import UNSET

from services.wire import schema
from services.wire.schema import RESPONSES, Response

WINDOW = 64 * 1024
NOTHING_WAITING = ()  # an idle connection's `waiting`: its deque (760 bytes) is made when a frame has to wait


class ConnectionClosed(Exception):
    """Raised by a connection's `write` when its socket is gone."""


_encode = msgspec.json.Encoder().encode  # of text pieces (a merge's size)
_copy = msgspec.structs.replace


def encode(frame):
    """A frame as the UTF-8 JSON bytes that go on the wire (Tornado sends bytes as a text frame as they are):
    msgspec encodes several times faster than json.dumps, and nothing is encoded to UTF-8 a second time."""
    return schema.encode(frame)


def is_chunk(frame):
    return type(frame) in RESPONSES and not frame.data.is_final


def is_final(frame):
    return type(frame) in RESPONSES and frame.data.is_final


def _message_id(frame):
    """The reply a waiting frame belongs to, when it may merge (Parley's `response`: LangBot's has no id)."""
    return frame.data.message_id if type(frame) is Response else None


def _replies(frame):
    """The replies a frame that is not a chunk speaks of (a final, rewind or status names one; `resumed` several)."""
    data = getattr(frame, "data", None)
    if (message_id := getattr(data, "message_id", None)) is not None:
        return (message_id,)
    return [r.message_id for r in getattr(data, "replies", None) or ()]


def mergeable(older, newer):
    """Delta chunks merge only when the newer continues the older: a resume's catch-up may start earlier."""
    old, new = older.data, newer.data
    if new.delta is not UNSET and old.delta is not UNSET and new.offset != old.offset + len(old.delta):
        return False
    if (new.thinking_delta is not UNSET and old.thinking_delta is not UNSET
            and new.thinking_offset != old.thinking_offset + len(old.thinking_delta)):
        return False
    return True


def merge(older, newer):
    """Fold a newer chunk of the same reply into an older waiting one (same stream mode). Returns the merged
    frame: a new one, so a frame shared with other connections is never changed."""
    old, new = _copy(older.data), newer.data
    if new.delta is not UNSET or new.thinking_delta is not UNSET:  # delta mode: concatenate increments
        if new.delta is not UNSET:
            if old.delta is not UNSET:
                old.delta += new.delta
            else:
                old.delta, old.offset = new.delta, new.offset
        if new.thinking_delta is not UNSET:
            if old.thinking_delta is not UNSET:
                old.thinking_delta += new.thinking_delta
            else:
                old.thinking_delta, old.thinking_offset = new.thinking_delta, new.thinking_offset
    else:  # cumulative mode: the newest text, announced from the oldest offset
        old.content, old.message_chain = new.content, new.message_chain
        if new.thinking is not UNSET:
            old.thinking = new.thinking
        if new.thinking_offset is not UNSET and old.thinking_offset is UNSET:
            old.thinking_offset = new.thinking_offset
    old.timestamp = new.timestamp
    return _copy(older, data=old)


def merged_size(size, newer, text=None):
    """The waiting entry's size once `newer` is folded in, without encoding the merged frame again (that made
    a busy socket's merges quadratic): a delta grows by its encoded increments (a key it did not have yet is
    not counted: tens of characters); a cumulative frame becomes as large as the newest."""
    new = newer.data
    if new.delta is not UNSET or new.thinking_delta is not UNSET:
        return size + sum(len(_encode(piece)) - 2 for piece in (new.delta, new.thinking_delta) if piece is not UNSET)
    return len(text) if text is not None else len(encode(newer))


class Outbox:
    def __init__(self, write, *, limit, on_overflow, on_sent=None):
        self.on_sent = on_sent          # on_sent(frame Struct class, bytes): metrics
        self.write = write              # write(text) -> Future resolved when flushed; raises when closed
        self.limit = limit
        self.on_overflow = on_overflow
        self.waiting = NOTHING_WAITING  # [frame, size, text, nbytes] in send order; frame None: pages
        self.waiting_size = 0
        self.finals_size = 0            # of waiting_size: final frames, which the limit does not count
        self.in_flight = 0
        self.chunks = {}                # message_id -> the waiting entry of its latest chunk
        self.merged = 0                 # chunks folded into another (for metrics and tests)
        self.overflowed = False

    def put(self, frame, text=None, nbytes=None):
        """Queue `frame`; `text` is its JSON encoding when the caller has it (shared by many connections)."""
        if not self.in_flight and not self.waiting:
            self._send(frame, text, nbytes)
            return
        mid = _message_id(frame)
        entry = self.chunks.get(mid) if mid else None
        if entry is not None and is_chunk(frame) and mergeable(entry[0], frame):
            entry[0] = merge(entry[0], frame)
            self.merged += 1
            entry[2] = entry[3] = None
            size = merged_size(entry[1], frame, text)
            self.waiting_size += size - entry[1]
            entry[1] = size
        else:
            if text is None:
                text = encode(frame)
            entry = [frame, len(text), text, nbytes]   # frame, characters, encoding, bytes (None: not known)
            self._waiting().append(entry)
            self.waiting_size += entry[1]
            if is_final(frame):
                self.finals_size += entry[1]
            if mid and is_chunk(frame):
                self.chunks[mid] = entry
            elif self.chunks:  # after a final, a rewind or a resumed, nothing may merge into earlier chunks:
                for message_id in _replies(frame):  # it would come before the frame that takes it back
                    self.chunks.pop(message_id, None)
        if self.waiting_size - self.finals_size > self.limit and not self.overflowed:
            self.overflowed = True
            self.on_overflow()

    def extend(self, message_id, offset, text, thinking_offset, thinking, timestamp):
        """What put() does with the next delta-mode chunk of a reply whose chunk is waiting here, without the
        frame being made: its text joins the waiting one. False (nothing done) when no chunk of the reply waits
        or the text does not continue it; the caller then makes the frame and put()s it."""
        entry = self.chunks.get(message_id)
        if entry is None:
            return False
        frame = entry[0]
        data = frame.data
        if data.content is not UNSET:  # a cumulative chunk
            return False
        if ((text and data.delta is not UNSET and offset != data.offset + len(data.delta))
                or (thinking and data.thinking_delta is not UNSET
                    and thinking_offset != data.thinking_offset + len(data.thinking_delta))):
            return False
        if entry[2] is not None:  # still the frame as the fan-out made it (maybe shared): merge into a copy
            data = _copy(data)
            frame = entry[0] = _copy(frame, data=data)
            entry[2] = entry[3] = None
        grown = 0
        if text:
            if data.delta is not UNSET:
                data.delta += text
            else:
                data.delta, data.offset = text, offset
            grown += len(_encode(text)) - 2
        if thinking:
            if data.thinking_delta is not UNSET:
                data.thinking_delta += thinking
            else:
                data.thinking_delta, data.thinking_offset = thinking, thinking_offset
            grown += len(_encode(thinking)) - 2
        data.timestamp = timestamp
        entry[1] += grown
        self.waiting_size += grown
        self.merged += 1
        if self.waiting_size - self.finals_size > self.limit and not self.overflowed:
            self.overflowed = True
            self.on_overflow()
        return True

    def put_pages(self, message_id, pages):
        """Queue an iterator of frames (one reply's catch-up), each made only when the socket has room for it."""
        self.chunks.pop(message_id, None)  # later chunks continue after the pages: never merge before them
        self._waiting().append([None, 0, pages, None])
        self._pump()

    def _waiting(self):
        if self.waiting is NOTHING_WAITING:
            self.waiting = deque()
        return self.waiting

    def _send(self, frame, text=None, nbytes=None):
        if text is None:
            text = encode(frame)
        future = self.write(text)
        if self.on_sent is not None:
            self.on_sent(type(frame), len(text))
        self.in_flight += len(text)
        future.add_done_callback(lambda f, n=len(text): self._flushed(f, n))

    def _flushed(self, future, size):
        self.in_flight -= size
        # a closed socket: nothing to do (reading the exception keeps asyncio from logging it as never retrieved)
        if not future.cancelled() and future.exception() is not None:
            return
        self._pump()

    def _pump(self):
        try:
            while self.waiting and self.in_flight < WINDOW:
                entry = self.waiting[0]
                if entry[0] is None:  # pages: the next one, or on to the next entry
                    frame = next(entry[2], None)
                    if frame is None:
                        self.waiting.popleft()
                    else:
                        self._send(frame)
                    continue
                frame, n, text, nbytes = self.waiting.popleft()
                self.waiting_size -= n
                if is_final(frame):
                    self.finals_size -= n
                mid = _message_id(frame)
                if mid and self.chunks.get(mid, [None])[0] is frame:
                    del self.chunks[mid]
                self._send(frame, text, nbytes)
            if not self.waiting:
                self.waiting = NOTHING_WAITING  # a busy moment is over: no deque kept per quiet connection
        except ConnectionClosed:
            self.waiting = NOTHING_WAITING
            self.chunks.clear()
            self.waiting_size = self.finals_size = 0
