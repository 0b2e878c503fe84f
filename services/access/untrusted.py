"""Decoding JSON that a client sent: every hostile shape becomes a BadRequest, never a RecursionError (deep
nesting) or a value that fails later, when it is echoed, logged or stored (a lone UTF-16 surrogate such as
"\\ud800" is valid JSON but cannot be encoded as UTF-8 or BSON).
"""
import json
import re

from services.wire.codes import Code
from services.wire.errors import BadRequest

MAX_DEPTH = 32  # objects/arrays inside each other; no Parley frame or body needs more than a few
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only an escape can carry one: the text itself is UTF-8


def loads(data, *, what="the frame", max_depth=MAX_DEPTH):
    """JSON text or UTF-8 bytes -> Python value. Raises BadRequest(code=invalid_json)."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{what} is not valid UTF-8", code=Code.INVALID_JSON) from None
    try:
        value = json.loads(data)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply", code=Code.INVALID_JSON) from None
    except ValueError:
        raise BadRequest(f"{what} is not valid JSON", code=Code.INVALID_JSON) from None
    if _too_deep(value, max_depth):
        raise BadRequest(f"{what} is nested more than {max_depth} levels deep", code=Code.INVALID_JSON)
    if _SURROGATE_ESCAPE.search(data) and _has_lone_surrogate(value):
        raise BadRequest(f"{what} contains a lone UTF-16 surrogate (\\ud800-\\udfff)", code=Code.INVALID_JSON)
    return value


def _too_deep(value, max_depth):
    stack = [(value, 0)]
    while stack:  # iterative: the check itself must not recurse
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth >= max_depth:
            return True
        stack.extend((child, depth + 1) for child in item)
    return False


def _has_lone_surrogate(value):
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
