"""Rate-limited warnings about peer input: peers control how often they misbehave."""

from __future__ import annotations

import logging
from collections import OrderedDict

MAX_REMEMBERED = 256


class WarnOnce:
    """Log the first problem from each source at WARNING, repeats at DEBUG; bounded memory."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __call__(self, source: str, message: str, *args: object) -> None:
        level = logging.DEBUG if source in self._seen else logging.WARNING
        self._seen[source] = None
        self._seen.move_to_end(source)
        while len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        self._log.log(level, "%s: " + message, source, *args)
