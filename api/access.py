"""Who may do what: HTTP Basic users of the API and its admins, slowed-down failed logins, and the
Host check that keeps a local server local (DNS rebinding).

Without `--api-auth` the API is local and every client is the admin.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.responses import PlainTextResponse

ADMIN = "admin"  # the owner name of every client when the API has no users
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool


class FailedLogins:
    """Each failed login from an address waits longer before its answer (0.5 s, 1 s, 2 s, ... up to
    `ceiling`), so guessing passwords is slow; a success clears the address's count."""

    def __init__(self, base: float = 0.5, ceiling: float = 8.0, forget_after: float = 900.0,
                 clock: Callable[[], float] = time.monotonic):
        self.base, self.ceiling, self.forget_after, self.clock = base, ceiling, forget_after, clock
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def failed(self, address: str) -> float:
        """Record a failure; the seconds to wait before answering it."""
        now = self.clock()
        with self._lock:
            count, last = self._failures.get(address, (0, now))
            count = 1 if now - last > self.forget_after else count + 1
            self._failures[address] = (count, now)
            if len(self._failures) > 10_000:  # many addresses: keep memory bounded
                self._failures = {a: v for a, v in self._failures.items() if now - v[1] <= self.forget_after}
        return min(self.ceiling, self.base * 2 ** (count - 1))

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


@dataclass
class ApiAccess:
    """HTTP Basic users (empty: no authentication, every client is the admin) and the admins."""

    users: dict[str, str] = field(default_factory=dict)
    admins: set[str] = field(default_factory=set)
    failures: FailedLogins = field(default_factory=FailedLogins)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], admins: list[str] | None = None) -> ApiAccess:
        users = dict(pairs)
        unknown = [name for name in admins or [] if name not in users]
        if unknown:
            raise ValueError(f"--api-admin names {', '.join(unknown)}, who are not in --api-auth")
        return cls(users, set(admins or []))

    async def identify(self, request: Request) -> Caller:
        if not self.users:
            return Caller(ADMIN, True)
        credentials: HTTPBasicCredentials | None = await _BASIC(request)
        address = request.client.host if request.client else "?"
        if credentials is not None:
            expected = self.users.get(credentials.username)
            if expected is not None and secrets.compare_digest(credentials.password.encode(), expected.encode()):
                self.failures.succeeded(address)
                return Caller(credentials.username, credentials.username in self.admins)
            await self.sleep(self.failures.failed(address))
        raise HTTPException(401, "wrong or missing credentials: this API needs HTTP Basic auth (--api-auth)",
                            headers={"WWW-Authenticate": "Basic"})


_BASIC = HTTPBasic(auto_error=False)
_ADMIN_NAMES = re.compile(r"[^,\s]+")


def parse_admins(text: str | None) -> list[str]:
    return _ADMIN_NAMES.findall(text or "")


def require_admin(caller: Caller, what: str = "do this") -> None:
    if not caller.admin:
        raise HTTPException(403, f"only an admin (--api-admin) may {what}")


def host_of(header: str) -> str:
    """The host name of a Host header (`[::1]:7860` -> `[::1]`, `localhost:7860` -> `localhost`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class LocalHostOnly:
    """ASGI middleware for a server that is neither `--listen` nor `--share`: it answers only requests
    whose Host is this machine's own name, so a web page cannot reach it through a name of its own
    that resolves to 127.0.0.1 (DNS rebinding)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in LOCAL_HOSTS:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                response = PlainTextResponse(
                    f"Host {host or '(none)'} refused: this Easel serves only this machine (localhost); "
                    "start it with --listen to serve other names", status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
