"""Who may use the console, and what a page may load: sessions after the token, CSRF tokens
for actions, the same-origin check, and the headers every console answer carries.

On TCP with `api_token` set, the console asks for the token once and then keeps a session: a
random id in an HttpOnly, SameSite=Strict cookie, kept in memory (a restart signs everyone
out) and expiring SESSION_SECONDS after sign-in. Without a token (the unix socket, whose file
mode decides who connects; or TCP without `api_token`) there is no sign-in.

Every action is a POST carrying a CSRF token: the session's own, or without a session one
derived from a secret made at start. Before that, a POST that a browser sent from another site
is refused for the whole API (`api.cross_site`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

COOKIE = "relayd_session"
SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 1000  # the oldest is dropped beyond this: sign-ins cannot fill the memory

# No inline script or style anywhere: what the console needs comes from /ui/static.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    id: str
    csrf: str
    expires: float


class Sessions:
    """Signed-in browsers, by the random id in their cookie."""

    def __init__(
        self, *, lifetime: float = SESSION_SECONDS, clock: Callable[[], float] = time.time
    ):
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self) -> Session:
        session = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), self._clock() + self.lifetime
        )
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        session = self._sessions.get(session_id or "")
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[session.id]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        self._sessions.pop(session_id or "", None)


class Guard:
    """The console's access rules on one listener: `token` None means no sign-in."""

    def __init__(self, token: str | None, sessions: Sessions) -> None:
        self.token = token
        self.sessions = sessions
        self._anonymous = hmac.new(secrets.token_bytes(32), b"csrf", hashlib.sha256).hexdigest()

    @property
    def signs_in(self) -> bool:
        return self.token is not None

    def token_matches(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())

    def session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def allowed(self, request: web.Request) -> bool:
        return not self.signs_in or self.session(request) is not None

    def csrf(self, request: web.Request) -> str:
        session = self.session(request)
        return session.csrf if session is not None else self._anonymous

    def csrf_ok(self, request: web.Request, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(request).encode())


def set_session_cookie(response: web.StreamResponse, session: Session, lifetime: float) -> None:
    response.set_cookie(
        COOKIE,
        session.id,
        max_age=int(lifetime),
        path="/ui",
        httponly=True,
        samesite="Strict",
    )
