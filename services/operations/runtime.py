"""<data-dir>/server.json: where a running server is (and, in token mode, its token), for clients started in the
same directory.

Jupyter's pattern (its runtime files): `make run` then `make client` (or `parley serve` then `parley client`) in
one directory needs no copied URL or token. Written at start-up (not in --cluster mode), private to the user (0600,
in the 0700 data directory), removed at exit; a file left by a killed server names a pid that is gone and is
ignored.
"""
import json
import os
from pathlib import Path

NAME = "server.json"


def write(data_dir, url, token):
    path = Path(data_dir) / NAME
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "pid": os.getpid()}, f)
    return path


def read(data_dir):
    """The running server's {"url", "token", "pid"}, or None (no file, unreadable, or its server is gone)."""
    try:
        info = json.loads((Path(data_dir) / NAME).read_text())
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process has that pid: not ours, but the file is readable, so it is ours
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(info.get("url"), str) and isinstance(info.get("token"), (str, type(None)))
    return info if ok else None


def remove(path):
    """At exit: only the file this process wrote (another server may have written it since)."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError):
        pass
