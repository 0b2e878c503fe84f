"""The outbox merges waiting chunks of a reply only when they are contiguous: a resume's catch-up can start
earlier than a chunk still waiting for a slow reader, and must stay its own frame."""
from tornado.concurrent import Future

from services.wire.outbox import WINDOW, Outbox
from tests.test_relay_coalescing import chunk, reply_frame


def test_only_contiguous_delta_chunks_merge():
    box = Outbox(lambda text: Future(), limit=10**9, on_overflow=lambda: None)
    box.in_flight = WINDOW  # the reader is slow: everything waits
    box.put(chunk(0, "abc"))
    box.put(chunk(3, "de"))      # continues: merged
    box.put(chunk(1, "bcdef"))   # a resume from offset 1: kept apart
    box.put(chunk(6, "g"))       # continues the catch-up: merged into it
    assert [(e[0].data.offset, e[0].data.delta) for e in box.waiting] == [(0, "abcde"), (1, "bcdefg")]


def test_merged_size_matches_the_merged_frames_encoding_without_encoding_it():
    from services.wire.outbox import encode, merge, merged_size

    older = chunk(0, 'say "hi"\n')
    size = len(encode(older))
    for newer in (chunk(9, "naïve 🙂 \\ "), chunk(20, "\t\x01 end")):
        older = merge(older, newer)
        size = merged_size(size, newer, encode(newer))
        assert size == len(encode(older))
    cumulative = reply_frame(content="a" * 50, offset=40)
    newest = reply_frame(content="a" * 90, offset=50)
    assert merged_size(len(encode(cumulative)), newest, encode(newest)) == len(encode(merge(cumulative, newest)))


def test_nothing_merges_into_a_chunk_waiting_before_a_rewind_or_resumed_of_its_reply():
    """A rewind (a new owner went on from a stored point) or a `resumed` queued behind a waiting chunk of its
    reply: the text that follows must not join that chunk. It would arrive before the rewind, which then takes it
    back, and the next chunk leaves a gap (under load: tests/test_failover.py's paused owners)."""
    from services.wire.schema import Resumed, ResumedData, ResumedReply, Rewind, RewindData

    rewind = Rewind(data=RewindData(session_id="s", message_id="m", seq=2, reply_to=None, epoch=2, offset=3,
                                    thinking_offset=0, reason="instance_lost", timestamp="t"))
    resumed = Resumed(data=ResumedData(session_id="s", timestamp="t", replies=[ResumedReply(
        message_id="m", seq=2, reply_to=None, status="streaming", epoch=2, offset=3, thinking_offset=0, length=3,
        thinking_length=0)]))
    for between in (rewind, resumed):
        box = Outbox(lambda text: Future(), limit=10**9, on_overflow=lambda: None)
        box.in_flight = WINDOW  # the reader is slow: everything waits
        box.put(chunk(0, "abc"))
        box.put(between)
        assert not box.extend("m", 3, "def", 0, "", "t"), "joined the chunk before the " + type(between).__name__
        box.put(chunk(3, "def"))
        box.put(chunk(6, "g"))  # (chunks after it still merge)
        assert [(type(e[0]).__name__, getattr(e[0].data, "delta", None)) for e in box.waiting] == [
            ("Response", "abc"), (type(between).__name__, None), ("Response", "defg")]
