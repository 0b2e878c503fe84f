"""One loop timer for every registered connection of this instance: WebSocket pings (a peer that leaves one
unanswered for --ping-timeout is closed, 1011 `ping_timeout`) and token expiry (a JWT's `exp`: `reconnect`, then
4401 `token_expired`).

Why not a timer per socket: two loop timers per connection (ping, expiry) were ~0.45 KB of each idle
connection, and Tornado's own pinger is a task per socket and cannot tell the handler that a ping timed out. The
sweep keeps no timer and no time of its own per connection: a connection is pinged at every multiple of
--ping-interval since it was created (so pings spread like the connects did), and the ping in flight is
remembered by the sweep's own clock value, shared by every connection it pinged. Each round (every `step`
seconds) visits the connections registered when it began, a tenth at a time.
"""
import asyncio
import logging
import time

from services.wire import frames
from services.wire.codes import PING_TIMEOUT, TOKEN_EXPIRED, Close

log = logging.getLogger(__name__)

MAX_STEP = 1.0   # token expiry is noticed within a second
MIN_STEP = 0.05
SLICES = 10      # a round over every connection runs in tenths: at 10,000 connections a whole round holds the
                 # loop ~6 ms, a tenth well under a millisecond


class Keepalive:
    def __init__(self, hub, *, ping_interval, ping_timeout):
        self.hub = hub
        self.interval = ping_interval if ping_interval and ping_interval > 0 else 0
        self.timeout = ping_timeout or self.interval  # 0: as long as the interval (Tornado's default too)
        shortest = min(x for x in (self.interval, self.timeout, 4 * MAX_STEP) if x > 0)
        self.step = max(MIN_STEP, shortest / 4)
        self.timer = None
        self.last = None  # wall time the current round began
        self.window = (0.0, 0.0)  # a ping is due when a multiple of the interval since connect falls in it
        self.round = []  # the connections of the current round
        self.next = 0  # the first of them not visited yet

    def start(self):
        self.last = time.time()
        self.timer = asyncio.get_running_loop().call_later(self.step / SLICES, self.tick)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.round = []

    def tick(self):
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.step / SLICES, self.tick)
        if self.next >= len(self.round):  # a new round; the windows of consecutive rounds tile the time
            wall = time.time()
            self.round, self.next, self.window, self.last = list(self.hub.connections.values()), 0, \
                (self.last, wall), wall
        share = -(-len(self.round) // SLICES)
        batch = self.round[self.next:self.next + share]
        self.next += share
        self.visit(batch, loop.time(), time.time())

    def visit(self, conns, now, wall):
        start, end = self.window
        interval, timeout = self.interval, self.timeout
        for conn in conns:
            if conn.closed:
                continue
            try:
                expires = conn.identity.expires_at
                if expires is not None and wall >= expires:
                    self.expired(conn)
                elif conn.pinged_at is not None:
                    if now - conn.pinged_at >= timeout:
                        conn.close(Close.UNAVAILABLE, PING_TIMEOUT)
                elif interval and (end - conn.created_at) // interval > (max(start, conn.created_at)
                                                                          - conn.created_at) // interval:
                    if conn.ping():
                        conn.pinged_at = now
            except Exception:  # one connection's failure must not stop the sweep for the others
                log.exception("keepalive failed conn_id=%s", conn.id)

    @staticmethod
    def expired(conn):
        """The client refreshes its token and reconnects (then `resume`s): say so before closing."""
        conn.send(frames.reconnect(TOKEN_EXPIRED))
        conn.close(Close.UNAUTHORIZED, TOKEN_EXPIRED)
