"""Rate-limited warnings about peer input: peers control how often they misbehave."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from kvpeer.discovery.peers import RateLimit

MAX_REMEMBERED = 256


class WarnOnce:
    """Log the first problem from each source at WARNING, repeats at DEBUG; bounded memory.

    ``rarely``: where a peer can make up sources (node ids), first problems pass through it
    too, so that a flood of new sources is not a flood of warnings.
    """

    def __init__(self, logger: logging.Logger, rarely: WarnRarely | None = None) -> None:
        self._log = logger
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._rarely = rarely

    def __call__(self, source: str, message: str, *args: object) -> None:
        seen = source in self._seen
        self._seen[source] = None
        self._seen.move_to_end(source)
        while len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        if seen:
            self._log.debug("%s: " + message, source, *args)
        elif self._rarely is not None:
            self._rarely("%s: " + message, source, *args)
        else:
            self._log.warning("%s: " + message, source, *args)


class WarnRarely:
    """Log one kind of peer-caused problem at WARNING a few times, then at most once per
    ``period_s`` saying how many went to DEBUG meanwhile.

    For problems whose source a peer can make up (a spoofed address, an invented service
    name): keyed by such a source, WarnOnce would warn at the sender's packet rate.
    """

    def __init__(
        self, logger: logging.Logger, period_s: float = 60.0, burst: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._limit = RateLimit(1 / period_s, burst)
        self._clock = clock
        self._quiet = 0  # logged at DEBUG since the last warning

    def __call__(self, message: str, *args: object) -> None:
        if not self._limit.allow(self._clock()):
            self._quiet += 1
            self._log.debug(message, *args)
            return
        if self._quiet:
            message += " (%d more like it since the last warning)"
            args = (*args, self._quiet)
            self._quiet = 0
        self._log.warning(message, *args)
