"""Per-client limits: running-or-queued jobs and submissions per hour, keyed on the address.

A client's active count is released when its job ends, not when the POST answers (the
origin design's mistake, which let its limit never hold)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque

from aiohttp import web

from .config import ClientsConfig
from .errors import UserError

HOUR_S = 3600.0
#: at most this many clients' submission windows are kept: beyond them the oldest is dropped
#: (that client starts afresh), as is every window idle for an hour
MAX_TRACKED_CLIENTS = 10_000


class TooManyJobs(UserError):
    status = 429
    code = "client_limit"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def client_address(request: web.BaseRequest, trust_forwarded_for: bool) -> str:
    """The client's address: the peer, or behind a trusted proxy the address that proxy
    appended last to X-Forwarded-For (the entries before it are the client's to forge)."""
    if trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1][:100]
    return request.remote or "unknown"


class ClientQuotas:
    """Admits a client's job or says when to retry; every count and window is bounded."""

    def __init__(self, config: ClientsConfig) -> None:
        self.config = config
        self._active: dict[str, int] = {}
        #: each client's submissions in the last hour, the client that submitted last at the end
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def admit(self, client: str) -> None:
        """Count a new job of `client`, or raise `TooManyJobs` (counting nothing)."""
        max_active, max_per_hour = self.config.max_active, self.config.max_per_hour
        if max_active and self._active.get(client, 0) >= max_active:
            raise TooManyJobs(f"at most {max_active} queued or running jobs per client", retry_after_s=5)
        now = time.monotonic()
        if max_per_hour:
            recent = self._recent.setdefault(client, deque(maxlen=max_per_hour))
            while recent and now - recent[0] >= HOUR_S:
                recent.popleft()
            if len(recent) >= max_per_hour:
                wait_s = math.ceil(HOUR_S - (now - recent[0]))
                raise TooManyJobs(f"at most {max_per_hour} jobs per client and hour", retry_after_s=wait_s)
            recent.append(now)
            self._recent.move_to_end(client)
            self._forget(now)
        self.hold(client)

    def _forget(self, now: float) -> None:
        """Drop the windows idle for an hour, and the oldest beyond MAX_TRACKED_CLIENTS: from
        the front, where the clients that submitted longest ago are, looking at no other."""
        while self._recent:
            client, recent = next(iter(self._recent.items()))
            if len(self._recent) <= MAX_TRACKED_CLIENTS and recent and now - recent[-1] < HOUR_S:
                return
            del self._recent[client]

    def hold(self, client: str) -> None:
        """Count an active job without the hourly check (a queued job recovered at start)."""
        self._active[client] = self._active.get(client, 0) + 1

    def release(self, client: str, *, refund: bool = False) -> None:
        """A job of `client` ended; with `refund`, it was admitted but then not accepted."""
        recent = self._recent.get(client)
        if refund and recent:
            recent.pop()
        left = self._active.get(client, 0) - 1
        if left > 0:
            self._active[client] = left
        else:
            self._active.pop(client, None)
        if recent is not None and (not recent or time.monotonic() - recent[-1] >= HOUR_S):
            del self._recent[client]
