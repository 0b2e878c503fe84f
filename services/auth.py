"""Who is calling. Handlers ask an Authenticator for the Identity of a request; services check access with it.

Mode `none` (the only mode until issue "Connections and security" adds `token` and `jwt`): every caller is
the single local user, an admin.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    user_id: str
    is_admin: bool = False


LOCAL_USER = Identity(user_id="local", is_admin=True)


class NoAuth:
    mode = "none"

    def identify(self, request):
        return LOCAL_USER
