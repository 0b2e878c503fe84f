"""The client's address behind a proxy: X-Real-IP / X-Forwarded-For count only when the peer is a trusted proxy.

Tornado's `xheaders=True` believes those headers from anyone, so a client could pick the address it is logged
and listed under. Parley reads them only from the peers named by --trusted-proxies (nginx/parley.conf sets them).
"""
from tornado import netutil


def client_address(request, trusted):
    """`request.remote_ip` is the socket's peer (xheaders off). Returns the address to log and list."""
    peer = request.remote_ip
    if not trusted or peer not in trusted:
        return peer
    real = request.headers.get("X-Real-Ip", "").strip()
    if netutil.is_valid_ip(real):
        return real
    # the right-most address that is not one of our proxies is the one the last trusted hop saw
    for candidate in reversed(request.headers.get("X-Forwarded-For", "").split(",")):
        candidate = candidate.strip()
        if candidate not in trusted and netutil.is_valid_ip(candidate):
            return candidate
    return peer


def public_origin(request, trusted):
    """scheme://host as the client reached us: behind a trusted proxy its X-Forwarded-Proto says the scheme (TLS
    ends at nginx), from anyone else the connection's own. For absolute links handed to other sites' pages."""
    scheme = request.protocol
    if trusted and request.connection.context.remote_ip in trusted:
        forwarded = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        if forwarded in ("http", "https"):
            scheme = forwarded
    return f"{scheme}://{request.host}"
