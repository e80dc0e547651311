"""Session time budgets: ``--time-limit`` parsed, the deadline it sets, and projections against it."""

import math
import re
import time
from dataclasses import dataclass, field

from competition.errors import ConfigError

# Every number carries its unit, except a number alone (seconds): "11h30" would read as 11 h 30 s.
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")
# After this long the first projection is made: long enough to be past start-up and warm-up.
PROJECT_AFTER_SECONDS = 60.0


def parse_duration(text: str, flag: str = "--time-limit") -> float | None:
    """``11h30m``, ``90m``, ``45s``, ``1.5h`` or plain seconds -> seconds; ``""``, ``0`` or ``none`` -> None (no limit)."""
    cleaned = str(text).strip().lower().replace(" ", "")
    if cleaned in ("", "0", "none", "off"):
        return None
    match = _DURATION.match(cleaned + "s" if _SECONDS.match(cleaned) else cleaned)
    if not match or not any(match.groups()):
        raise ConfigError(f"{flag} {text!r}: a duration such as 11h30m, 90m, 45s or 1.5h (0 or none: no limit)")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not math.isfinite(total) or total <= 0:
        raise ConfigError(f"{flag} {text!r}: must be longer than 0 (0 or none: no limit)")
    return total


def format_duration(seconds: float) -> str:
    """3725 -> ``1h02m``, 125 -> ``2m05s``, 42.4 -> ``42s``: what a person reads in a log line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class Deadline:
    """A time limit counted from ``started`` (a ``time.monotonic()`` reading); no limit when ``limit`` is None."""

    limit: float | None
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return math.inf if self.limit is None else self.limit - self.elapsed()

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more work ends before the limit."""
        return seconds <= self.remaining()

    def describe(self) -> str:
        return "no time limit" if self.limit is None else f"time limit {format_duration(self.limit)}"
