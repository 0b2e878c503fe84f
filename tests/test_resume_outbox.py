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
