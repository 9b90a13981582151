"""Volume: instances per window against the client's own history and against its tier.

Extraction needs many queries. Two signals, both on instances (a batch of 64 is 64 queries):

- ``volume_spike``: the current window's count as a z-score against the client's own past
  active windows. Their counts and squared counts are averaged with weights that halve every
  ``half_life_s`` of time, so an idle gap ages the history without pulling its mean to zero (a
  user back from lunch at the usual pace is not a spike). The spread is floored at the Poisson
  one (``sqrt(mean)``, at least 1) so a steady client is not alarmed by one extra query. The
  z-score needs a recent history weighing ``min_windows`` windows (capped at half what a
  half-life allows), so a new client, or one back after long idle, is judged by the second
  signal only until it has one. It scores 0 below ``z_alarm``, 0.5 at it and 1 at twice it.
- ``sustained_volume``: the tier's reference ``sustained_per_min``: the number of consecutive
  closed windows above it, ``sustained_windows`` of them scoring 1.

Windows are aligned to the client's first observation and advanced by ``observation.now``, so
irregular arrivals and idle gaps (one decay factor for all the empty windows) need no timer.
A timestamp earlier than the current window counts in the current window. The state is a few
floats.
"""

from __future__ import annotations

import math
import struct
from typing import Final

from extauthz.detect.base import Observation, Verdict

__all__ = ["VolumeDetector"]

_MAGIC: Final = b"VO1"
# magic, window start, current count, weighted sums of past window counts, of their squares and of
# the weights, consecutive windows above the tier's reference.
_STATE: Final = struct.Struct("<3sdddddI")


class VolumeDetector:
    """Score a client's instance rate: spikes against its own past, sustained against its tier."""

    name = "volume"

    def __init__(
        self,
        *,
        sustained_per_min: float,
        half_life_s: float = 600.0,
        window_s: float = 60.0,
        z_alarm: float = 4.0,
        sustained_windows: int = 5,
        min_windows: int = 5,
    ) -> None:
        if sustained_per_min <= 0 or half_life_s <= 0 or window_s <= 0 or z_alarm <= 0:
            raise ValueError("rates, durations and z_alarm must be positive")
        if sustained_windows <= 0 or min_windows <= 0:
            raise ValueError("sustained_windows and min_windows must be positive")
        self.sustained_per_min = sustained_per_min
        self.half_life_s = half_life_s
        self.window_s = window_s
        self.z_alarm = z_alarm
        self.sustained_windows = sustained_windows
        self.min_windows = min_windows
        # The weight an old window keeps when one more closes.
        self._keep = 0.5 ** (window_s / half_life_s)
        self._per_window = sustained_per_min * window_s / 60.0
        # The most a history can weigh is 1 / (1 - keep) windows; ask for at most half of it.
        self._min_weight = min(float(min_windows), 0.5 / (1.0 - self._keep))

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Count the observation's instances in its window; return the state and the verdict."""
        now = observation.now
        if not math.isfinite(now):
            raise ValueError("observation.now must be finite")
        start, count, total, square, weight, run = self._load(state, now)
        elapsed = now - start
        if elapsed >= self.window_s:
            # Close the current window, then age the history by the empty ones up to ``now``.
            empty = int(elapsed // self.window_s) - 1
            if count > 0:
                total = self._keep * total + count
                square = self._keep * square + count * count
                weight = self._keep * weight + 1.0
            run = run + 1 if count > self._per_window else 0
            if empty > 0:
                decay = self._keep**empty
                total, square, weight = total * decay, square * decay, weight * decay
                run = 0
            start += (1 + empty) * self.window_s
            count = 0.0
        count += max(observation.instances, 0)
        z = self._z(count, total, square, weight)
        spike = 0.0 if z < self.z_alarm else min(0.5 + (z - self.z_alarm) / (2 * self.z_alarm), 1.0)
        sustained = min(run / self.sustained_windows, 1.0)
        new_state = _STATE.pack(_MAGIC, start, count, total, square, weight, run)
        detail = f"window_count={count:.0f} z={z:.2f} sustained_windows={run}"
        if spike <= 0.0 and sustained <= 0.0:
            return new_state, Verdict(0.0, "", detail)
        if spike >= sustained:
            return new_state, Verdict(spike, "volume_spike", detail)
        return new_state, Verdict(sustained, "sustained_volume", detail)

    def _z(self, count: float, total: float, square: float, weight: float) -> float:
        """Return the current window's z-score against the weighted history (0 while young)."""
        if weight < self._min_weight:
            return 0.0
        mu = total / weight
        variance = max(square / weight - mu * mu, 0.0)
        spread = max(math.sqrt(variance), math.sqrt(mu), 1.0)
        return (count - mu) / spread

    def _load(
        self, state: bytes | None, now: float
    ) -> tuple[float, float, float, float, float, int]:
        """Parse state bytes; a missing or foreign one starts a window at ``now``."""
        if state and len(state) == _STATE.size:
            magic, start, count, total, square, weight, run = _STATE.unpack(state)
            if magic == _MAGIC:
                return start, count, total, square, weight, run
        return now, 0.0, 0.0, 0.0, 0.0, 0
