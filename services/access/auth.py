"""Who is calling. Handlers get an Identity from the Authenticator; services check access with it.

Modes:
- `token` (default): one random token made at start-up (or --token), printed with a ready-to-open URL, as
  Jupyter does. Whoever holds it is the single local user, an admin. The quickstart stays one command, yet
  nothing is open.
- `jwt`: HS256 with a shared secret or RS256 with a public key (PyJWT). `sub` is the user id; a role claim
  (default `role`, value `admin`) marks admins; `exp` is required and enforced.
- `none`: explicit opt-in for local development; everyone is the local admin. Refused unless bound to loopback.

Credentials: `Authorization: Bearer <token>`, or `?token=` (for WebSocket clients that cannot set headers;
scrubbed from logs), or, on a WebSocket, a first frame `{"type": "authenticate", "token": ...}`, or the web app's
sign-in cookie (Jupyter's pattern: `POST /api/v1/auth/cookie` with a Bearer credential sets it, HttpOnly and
SameSite=Strict, holding that credential, verified like a Bearer one on every request; cross-site writes and
WebSockets are refused by the same-origin checks, `DELETE` clears it).
"""
import hmac
import ipaddress
import logging
import secrets
import dataclasses
import time
from dataclasses import dataclass

from services.wire.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

MODES = ("token", "jwt", "none")
COOKIE = "parley_auth"  # the web app's sign-in cookie
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash; shorter ones are brute-forced
# A client reconnecting (or opening tabs) presents the same JWT again: its verified claims are remembered for a
# while, never past its `exp`, so the signature check and claim parsing run once per token, not per connection.
VERIFIED_TOKENS = 1024
VERIFIED_SECONDS = 60.0


def check_jwt_secret(secret):
    if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"--jwt-secret is {len(secret.encode())} bytes; an HS256 secret needs at least "
                         f"{MIN_SECRET_BYTES} (make one: python -c 'import secrets; print(secrets.token_urlsafe(48))')")


@dataclass(frozen=True)
class Identity:
    user_id: str
    is_admin: bool = False
    expires_at: float | None = dataclasses.field(default=None, compare=False)  # JWT `exp`: a socket ends then
    visitor: str = ""   # an embed bot's anonymous visitor (services/access/visitors.py): that bot's id


LOCAL_USER = Identity(user_id="local", is_admin=True)


def bearer_or_query_token(request):
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    values = request.query_arguments.get("token")
    return values[-1].decode("utf-8", "replace") if values else None


def request_credential(request):
    """Bearer header, `?token=`, then the sign-in cookie: the first present (None if none is)."""
    token = bearer_or_query_token(request)
    if token:
        return token
    cookie = request.cookies.get(COOKIE)
    return cookie.value if cookie is not None and cookie.value else None


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, mode="token", *, token=None, jwt_secret=None, jwt_public_key=None, admin_claim="role",
                 admin_value="admin", audience=None, issuer=None, host="127.0.0.1"):
        if mode not in MODES:
            raise ValueError(f"auth mode must be one of {', '.join(MODES)}")
        self.mode = mode
        if mode == "none":
            if not is_loopback(host):
                raise ValueError("--auth none is only allowed when Parley listens on a loopback address")
            log.warning("authentication is OFF (--auth none): every client is the local admin")
        self.token = (token or secrets.token_urlsafe(24)) if mode == "token" else None
        if mode == "jwt":
            import jwt  # PyJWT, and the cryptography it imports (~50 ms of start-up), only when used
            self._jwt = jwt
            if bool(jwt_secret) == bool(jwt_public_key):
                raise ValueError("--auth jwt needs exactly one of --jwt-secret (HS256) or --jwt-public-key (RS256)")
            check_jwt_secret(jwt_secret)
            self._jwt_key = jwt_secret or jwt_public_key
            self._jwt_algorithms = ["HS256"] if jwt_secret else ["RS256"]
        self.admin_claim = admin_claim
        self.admin_value = admin_value
        self.audience = audience
        self.issuer = issuer
        self._verified = {}  # JWT -> (Identity, time until which it is taken without checking again)

    @property
    def requires_credentials(self):
        return self.mode != "none"

    def identify(self, request):
        """The caller of an HTTP request or WebSocket handshake; raises Unauthorized."""
        if self.mode == "none":
            return LOCAL_USER
        token = request_credential(request)
        if not token:
            raise Unauthorized("credentials required: Authorization: Bearer <token>")
        return self.verify(token)

    def verify(self, token):
        if self.mode == "none":
            return LOCAL_USER
        if not isinstance(token, str) or not token:
            raise Unauthorized("the token must be a non-empty string")
        if self.mode == "token":
            if hmac.compare_digest(token.encode(), self.token.encode()):
                return LOCAL_USER
            raise Unauthorized("invalid token")
        now = time.time()
        known = self._verified.get(token)
        if known is not None:
            if now < known[1]:
                return known[0]
            del self._verified[token]
        identity = self._verify_jwt(token)
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = (identity, min(now + VERIFIED_SECONDS, identity.expires_at))
        return identity

    def _verify_jwt(self, token):
        jwt = self._jwt
        try:
            claims = jwt.decode(token, self._jwt_key, algorithms=self._jwt_algorithms, audience=self.audience,
                                issuer=self.issuer, options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 128:
            raise Unauthorized("invalid token: `sub` must be a non-empty string")
        role = claims.get(self.admin_claim)
        is_admin = role == self.admin_value or (isinstance(role, list) and self.admin_value in role)
        return Identity(user_id=sub, is_admin=is_admin, expires_at=float(claims["exp"]))


def require_admin(identity):
    if not identity.is_admin:
        raise Forbidden("this operation is for admins")
