"""Rate-limited logging, so that a flood of bad input cannot flood the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs


@attrs.define(slots=True)
class RateLimitedLog:
    """Log lines at most `per_second` a second (a token bucket); the rest are
    counted and the count is reported with the next line that gets through.
    Callers still count every event in their statistics."""

    logger: logging.Logger
    per_second: float = 20.0
    clock: Callable[[], float] = time.monotonic
    _tokens: float = attrs.field(init=False)
    _last: float = attrs.field(default=0.0, init=False)
    _suppressed: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.per_second
        self._last = self.clock()

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: object, exc_info: bool = False) -> None:
        self.log(logging.ERROR, message, *args, exc_info=exc_info)

    def log(
        self, level: int, message: str, *args: object, exc_info: bool = False
    ) -> None:
        """Log at `level` if the budget allows; `exc_info` adds the traceback
        of the exception being handled (only to lines that get through)."""
        now = self.clock()
        self._tokens = min(
            self.per_second, self._tokens + (now - self._last) * self.per_second
        )
        self._last = now
        if self._tokens < 1:
            self._suppressed += 1
            return
        self._tokens -= 1
        if self._suppressed:
            message += (
                " (%d similar warnings suppressed)"
                if level == logging.WARNING
                else " (%d similar lines suppressed)"
            )
            args = (*args, self._suppressed)
            self._suppressed = 0
        self.logger.log(level, message, *args, exc_info=exc_info)
