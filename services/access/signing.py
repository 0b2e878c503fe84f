"""Short signed strings: links to a stored file that work without credentials until they expire (an upstream
model fetching an image, an <img> in someone's page), and the tokens anonymous widget visitors keep.

The key is made once per store (`Store.signing_key`), so every instance of a cluster signs alike and a visitor's
token outlives restarts. Delete the `meta` document `signing_key` and restart to revoke everything signed.
"""
import base64
import hashlib
import hmac
import json
import time

SIG_CHARS = 32  # of base64url HMAC-SHA256: 192 bits


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, key):
        self._key = key

    def sign(self, purpose, *parts):
        """A signature of `parts` for one `purpose` (a file link never passes for a visitor token)."""
        message = "\0".join((purpose, *map(str, parts))).encode("utf-8", "surrogatepass")
        return b64(hmac.new(self._key, message, hashlib.sha256).digest())[:SIG_CHARS]

    def check(self, signature, purpose, *parts):
        return isinstance(signature, str) and hmac.compare_digest(signature, self.sign(purpose, *parts))

    def token(self, purpose, claims):
        """`claims` (JSON) as `<payload>.<signature>`: readable by anyone, changed by nobody."""
        payload = b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{payload}.{self.sign(purpose, payload)}"

    def claims(self, purpose, token):
        """The claims of a token this key signed for `purpose`, or None."""
        if not isinstance(token, str) or len(token) > 2048 or token.count(".") != 1:
            return None
        payload, signature = token.split(".")
        if not self.check(signature, purpose, payload):
            return None
        try:
            claims = json.loads(unb64(payload))
        except ValueError:
            return None
        return claims if isinstance(claims, dict) else None


def expiry(lifetime, now=None, step=3600):
    """A link's expiry, rounded up to `step`: every link to one file made in the same hour is the same text (the
    browser caches it once), and it stays valid at least `lifetime` seconds."""
    now = time.time() if now is None else now
    return int((now + lifetime) // step + 1) * step
