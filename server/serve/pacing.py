"""How many batches a message carries when its stream lets the server choose (``Space.fewer``).

The server's loop gives each open stream one message a turn, so a rank whose trainer takes batches
as fast as they come waits about a round between its messages: ``streams / messages per second``.
Large messages cost the least CPU a token (server and client alike), small ones keep the round
short when many ranks share the server. So the batches a message (one number for the server, each
stream's own ceiling applied) follow the round: every window, scaled by ``target_gap_s / round``
(at most halved or doubled). Trainers slower than the server also make a long round (they ask
for few messages): their messages shrink too, which costs them a few hundred microseconds of CPU
a batch they can spare, and nothing in tokens/s. (The process's CPU time is no test of whether
the server is the limit: on a machine shared with other work it gets a third of a core and is.)

A figure from ``benchmarks/bench_scale.py`` (64 ranks of one job, batches of 4 x 1,024 tokens, 2
cores): about 180 us of server CPU a message at one batch, 20 us a batch more; one batch a message
keeps a 16 ms round but caps the job at a tenth of one stream's tokens/s, 16 triple its tokens/s
at a 33 ms round.

Never fewer batches than ``min_tokens`` (``server.paced_min_tokens``) hold, within the stream's
ceiling: when the server shares its cores with other work, every message is slower whatever its
size, and following the round alone shrank 64 ranks' messages to one batch, where the message's
own cost is most of the work (measured under load: 1.3 batches a message and 7 M tokens/s,
against 8 batches and 27 M with the floor). At the default floor a message's own cost is at most
about half of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from server import metrics
from server.serve.protocol import MAX_BATCHES_PER_MESSAGE

__all__ = ["MESSAGE_COST_TOKENS", "START_STALL_S", "Pacing"]

#: a message's own server cost (gRPC send, ring write, cursors, meter) in the tokens of batch work
#: that cost as much (``bench_scale``: ~240 us a message against ~30 us a batch of 4,096 tokens)
MESSAGE_COST_TOKENS = 32_768
#: A job's start suspends the floor while its streams keep getting their first messages (or new
#: ones open). Once none has for this long, a stream still waiting for its first (its source down
#: and retried, a plan's skip into a shard that will not load) no longer keeps every other
#: stream's messages at the round's size.
START_STALL_S = 1.0


class Pacing:
    """The server's batches a message for streams with ``batches_adaptive``: ``batches(ceiling,
    batch_tokens)`` per message; ``opened``/``closed`` count the streams sharing the loop,
    ``served`` a stream's first message, ``sent`` each message."""

    def __init__(self, target_gap_s: float = 0.03, window_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, min_tokens: int = MESSAGE_COST_TOKENS) -> None:
        self.target_gap_s, self.window_s, self.min_tokens = target_gap_s, window_s, min_tokens
        self.streams = 0
        self.starting = 0  # streams still waiting for their first message: no floor until all have it
        self._clock = clock
        self._scale: float | None = None  # batches a message, before each stream's ceiling; None: not yet measured
        self._messages = 0
        # this window's smallest message (before its stream's ceiling) and largest ceiling: the
        # scale starts its next step from within them (see ``sent``)
        self._smallest, self._ceiling = MAX_BATCHES_PER_MESSAGE, 0
        self._since = clock()
        self._starts = 0  # streams opened, first messages sent, streams gone before theirs: a start moving
        self._starts_seen, self._starts_moved = -1, 0.0  # the count last seen, and when it last changed

    def opened(self) -> None:
        self.streams += 1
        self.starting += 1
        self._starts += 1

    def served(self) -> None:
        """A stream's first message went out."""
        self.starting -= 1
        self._starts += 1

    def closed(self, served: bool = True) -> None:
        self.streams -= 1
        if not served:
            self.starting -= 1
            self._starts += 1

    def batches(self, ceiling: int, batch_tokens: int = 0) -> int:
        """Batches for the next message of a stream that asked for at most ``ceiling``, each of
        ``batch_tokens`` tokens: never fewer than ``min_tokens`` hold."""
        if self.streams <= 1:
            return ceiling
        if self._scale is None:  # not measured yet (a job starting): the ceiling shared
            return max(1, min(ceiling, int(ceiling / self.streams + 0.5)))
        # While a stream waits for its first message (a job starting), messages follow the round
        # alone: a floor of 8 batches made the last ranks of a 64-rank job wait 50% longer.
        floor = -(-self.min_tokens // batch_tokens) if batch_tokens > 0 else 1
        if floor > 1 and self.job_starting():
            floor = 1
        size = max(floor, int(self._scale + 0.5))
        self._smallest, self._ceiling = min(self._smallest, size), max(self._ceiling, ceiling)
        return max(1, min(ceiling, size))

    def job_starting(self) -> bool:
        """Whether streams wait for their first message (a job starting), unless that start has
        stalled (``START_STALL_S``)."""
        return self.starting > 0 and not self._start_stalled()

    def _start_stalled(self) -> bool:
        """Whether no stream has opened, had its first message or gone for ``START_STALL_S``."""
        now = self._clock()
        if self._starts != self._starts_seen:
            self._starts_seen, self._starts_moved = self._starts, now
        return now - self._starts_moved > START_STALL_S

    def sent(self) -> None:
        """A message went out; every ``window_s``, the size of the next ones is decided anew: the
        scale times ``target_gap_s`` over the round, from where the messages were. Where every
        message was held at its floor, the step starts from the smallest of them, and where the
        scale is past every stream's ceiling, from the largest ceiling. (A loaded server's round
        stays long at the floor: the scale went on halving beneath it, to 1, while messages held
        8 batches and ``tokenfeed_paced_batches_per_message`` said 1; once the round was short
        again, messages stayed at the floor until the scale had doubled its way back. It still
        goes one step below the floor, which is where a job that starts next begins: the floor
        does not apply while its ranks wait for their first messages.)"""
        self._messages += 1
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self.window_s:
            return
        rounds = self._messages / elapsed / max(1, self.streams)  # rounds a second, were every stream sending
        scale = self._scale if self._scale is not None else 1.0
        held = 1.0  # what every message held at least, where that is more than the scale gave
        if self._ceiling:  # (a window whose messages were sized from the scale)
            if self._smallest > int(scale + 0.5):
                scale = held = float(self._smallest)
            scale = min(scale, float(self._ceiling))
        scale *= min(2.0, max(0.5, self.target_gap_s * rounds))
        self._scale = min(float(MAX_BATCHES_PER_MESSAGE), max(1.0, scale))
        metrics.PACED_BATCHES.set(max(self._scale, held))
        self._messages, self._since = 0, now
        self._smallest, self._ceiling = MAX_BATCHES_PER_MESSAGE, 0
