"""Schedules as plain objects: value = schedule(step), so resuming at any step is exact."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from `start` to `peak` over `warmup_steps`, then cosine decay to `final`:

        v(t) = start + (peak - start) * t / W                               for t < W
        v(t) = final + (peak - final) * (1 + cos(pi * (t - W) / (T - W))) / 2   for W <= t < T
        v(t) = final                                                        for t >= T
    """

    peak: float
    total_steps: int
    warmup_steps: int = 0
    final: float = 0.0
    start: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.final
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))
