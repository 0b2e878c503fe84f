"""Cursor paging for every REST list: `limit` + an opaque `cursor`; each page answers `next_cursor` (null on the
last page). A cursor is base64url JSON naming its list and the position after the last item returned (keyset
paging: a page never repeats or skips an item because earlier items were added), so it cannot be used on another
list. Clients must treat it as opaque; its content may change between versions.
"""
import base64
import binascii
import json

from services.wire.codes import Code
from services.wire.errors import BadRequest


def encode(kind, position):
    raw = json.dumps({"k": kind, "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(kind, cursor):
    """The position a cursor of list `kind` holds; None for no cursor (the first page)."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadRequest("cursor is not one this server gave out", code=Code.INVALID_CURSOR) from None
    if not isinstance(doc, dict) or doc.get("k") != kind or "p" not in doc:
        raise BadRequest(f"cursor is not a cursor of this list ({kind})", code=Code.INVALID_CURSOR)
    return doc["p"]


def page(items, limit, kind, position_of):
    """`items` fetched with limit + 1: the page, and the cursor to the next one (None when this is the last)."""
    if len(items) <= limit:
        return items, None
    items = items[:limit]
    return items, encode(kind, position_of(items[-1]))


def in_memory(values, limit, kind, cursor, key=lambda v: v):
    """Page a list held in memory (members, connections) by a sorted string key: (page, next_cursor)."""
    after = decode(kind, cursor)
    if after is not None and not isinstance(after, str):
        raise BadRequest("cursor is not one this server gave out", code=Code.INVALID_CURSOR)
    ordered = sorted(values, key=key)
    if after is not None:
        ordered = [v for v in ordered if key(v) > after]
    return page(ordered[:limit + 1], limit, kind, key)
