"""Admission limits: connection caps and a per-user message rate (token bucket). Plain dicts on the loop."""
import time

from services.wire.errors import Capacity, RateLimited



class RateLimiter:
    """`rate` messages per second per user, bursts of up to `burst`."""

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets = {}  # user_id -> (tokens, when)

    def take(self, user_id):
        now = self.clock()
        tokens, when = self.buckets.get(user_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            retry_after = round((1 - tokens) / self.rate, 3)
            raise RateLimited(f"too many messages; retry in {retry_after:g} s", retry_after=retry_after)
        self.buckets[user_id] = (tokens - 1, now)
        if len(self.buckets) > 10_000:  # forget users whose bucket has refilled: memory stays bounded
            full = [u for u, (t, w) in self.buckets.items() if t + (now - w) * self.rate >= self.burst]
            for u in full:
                del self.buckets[u]


def check_capacity(hub, identity, *, max_total, max_per_user):
    """`identity` None: a socket not yet authenticated (only the total applies)."""
    if len(hub.connections) + hub.pending >= max_total:
        raise Capacity(f"the server is at its connection limit ({max_total}); try again later")
    if identity is not None and len(hub.by_user.get(identity.user_id, ())) >= max_per_user:
        raise Capacity(f"you already have {max_per_user} connections open; close one first")
