"""Which upstream serves the next request of one model: plain logic, no I/O (unit-tested alone).

- **Least outstanding requests**: among the upstreams that may take traffic, the one with the fewest requests
  in flight from this process; ties go to the first listed (so an idle gateway is predictable).
- **Prefix affinity**: a prompt at least `affinity_chars` long is keyed by its first `affinity_chars`
  characters, and rendezvous hashing maps the key to one upstream, so requests sharing a long prefix (a system
  prompt, a document, a conversation so far) land where that prefix is already in the KV cache. Rendezvous
  hashing moves only the keys of an upstream that leaves. Affinity yields to load: when the chosen upstream has
  `affinity_max_excess` more requests in flight than the least loaded one, the least loaded one wins.
- **Active health**: `record_health()` takes the result of a `GET /health` probe; an unhealthy upstream
  gets no traffic until a probe succeeds again.
- **Passive ejection**: `eject_after` consecutive failures (connection refused, timeout, 5xx, a broken
  stream) eject an upstream for `eject_s` seconds; then it is tried again (half-open): one success brings it
  back, one more failure ejects it again. A successful health probe also ends an ejection.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class UpstreamState:
    name: str  # host:port, shown in /health (never the key)
    index: int
    healthy: bool = True  # the last health probe (optimistic until the first one answers)
    ejected_until: float = 0.0  # monotonic time before which passive ejection keeps it out
    consecutive_failures: int = 0
    outstanding: int = 0  # requests of this process in flight on it
    num_requests: int = 0
    num_failures: int = 0

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def snapshot(self, now: float) -> dict:
        return {
            "name": self.name, "healthy": self.healthy, "ejected": now < self.ejected_until,
            "outstanding": self.outstanding, "consecutive_failures": self.consecutive_failures,
            "num_requests": self.num_requests, "num_failures": self.num_failures,
        }


class Router:
    def __init__(
        self,
        names: Iterable[str],
        *,
        eject_after: int = 3,
        eject_s: float = 30.0,
        affinity_chars: int = 1024,
        affinity_max_excess: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.upstreams = [UpstreamState(name=name, index=i) for i, name in enumerate(names)]
        if not self.upstreams:
            raise ValueError("a routed model needs at least one upstream")
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.affinity_chars = affinity_chars
        self.affinity_max_excess = affinity_max_excess
        self._clock = clock

    # ---- choosing -------------------------------------------------------------------------------
    def affinity_key(self, prompt_text: str) -> str | None:
        """The key of a prompt long enough to share a cached prefix worth routing for, else None."""
        if self.affinity_chars <= 0 or len(prompt_text) < self.affinity_chars:
            return None
        return prompt_text[: self.affinity_chars]

    def pick(self, key: str | None = None, exclude: Iterable[UpstreamState] = ()) -> UpstreamState | None:
        """The upstream for the next try of a request (None: every one is excluded, unhealthy or ejected)."""
        now = self._clock()
        excluded = {u.index for u in exclude}
        candidates = [u for u in self.upstreams if u.index not in excluded and u.available(now)]
        if not candidates:
            return None
        least = min(candidates, key=lambda u: (u.outstanding, u.index))
        if key is None:
            return least
        preferred = max(candidates, key=lambda u: _rendezvous(key, u.name))
        if preferred.outstanding - least.outstanding >= self.affinity_max_excess:
            return least
        return preferred

    # ---- accounting -----------------------------------------------------------------------------
    def started(self, upstream: UpstreamState) -> None:
        upstream.outstanding += 1
        upstream.num_requests += 1

    def ended(self, upstream: UpstreamState) -> None:
        upstream.outstanding -= 1

    def now(self) -> float:
        return self._clock()

    def succeeded(self, upstream: UpstreamState) -> None:
        upstream.consecutive_failures = 0
        upstream.ejected_until = 0.0

    def failed(self, upstream: UpstreamState) -> None:
        upstream.num_failures += 1
        upstream.consecutive_failures += 1
        if upstream.consecutive_failures >= self.eject_after:
            upstream.ejected_until = self._clock() + self.eject_s

    def record_health(self, upstream: UpstreamState, ok: bool) -> None:
        upstream.healthy = ok
        if ok and upstream.ejected_until:
            upstream.ejected_until = 0.0  # the probe proves it answers again: recovery without waiting
            upstream.consecutive_failures = 0

    @property
    def any_available(self) -> bool:
        now = self._clock()
        return any(u.available(now) for u in self.upstreams)

    def snapshot(self) -> list[dict]:
        now = self._clock()
        return [u.snapshot(now) for u in self.upstreams]


def _rendezvous(key: str, name: str) -> int:
    """Highest-random-weight score of (key, upstream): the same key always prefers the same upstream."""
    digest = hashlib.blake2b(f"{name}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
