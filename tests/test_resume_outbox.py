"""The outbox merges waiting chunks of a reply only when they are contiguous: a resume's catch-up can start
earlier than a chunk still waiting for a slow reader, and must stay its own frame."""
from tornado.concurrent import Future

from services.outbox import WINDOW, Outbox


def chunk(offset, text):
    return {"type": "response", "data": {"message_id": "m", "is_final": False, "offset": offset, "delta": text,
                                         "timestamp": "t"}}


def test_only_contiguous_delta_chunks_merge():
    box = Outbox(lambda text: Future(), limit=10**9, on_overflow=lambda: None)
    box.in_flight = WINDOW  # the reader is slow: everything waits
    box.put(chunk(0, "abc"))
    box.put(chunk(3, "de"))      # continues: merged
    box.put(chunk(1, "bcdef"))   # a resume from offset 1: kept apart
    box.put(chunk(6, "g"))       # continues the catch-up: merged into it
    assert [(e[0]["data"]["offset"], e[0]["data"]["delta"]) for e in box.waiting] == [(0, "abcde"), (1, "bcdefg")]
