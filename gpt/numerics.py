"""The training loop's numerics watch: a step whose loss or gradient norm is not finite, or whose
loss spikes far above the recent ones, does not update the weights.

After a step's backward, ``guard.check(step, loss, grad_norm)`` says whether to take the optimizer
step:

* a NaN or infinite loss or gradient norm: the step is skipped (``on_nonfinite="skip"``, the
  default), or the run stops at once (``"stop"``);
* a loss spike: the loss's z-score against the mean and standard deviation of the last
  ``spike_window`` losses exceeds ``spike_zscore`` (llm.c's outlier test; 0 switches it off).
  Scoring starts once the window is full, and every finite loss joins the window, skipped or not,
  so a lasting change of level widens the window's spread and is accepted after a few steps
  instead of being skipped forever;
* after ``max_consecutive_skips`` skipped steps in a row, of either kind, the run stops (0: never):
  skipping is for the odd bad batch, not for a run that has diverged.

The counters and the window are part of the checkpoint (``state_dict``), so a resumed run decides
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

ON_NONFINITE = ("skip", "stop")
SKIP_REASONS = ("nonfinite", "loss_spike")


@dataclass(frozen=True)
class Verdict:
    update: bool  # take the optimizer step
    skip_reason: str | None = None  # one of SKIP_REASONS when the step is skipped
    zscore: float | None = None  # the loss's z-score, once the window is full
    message: str | None = None  # one line for the user when the step is skipped
    stop: str | None = None  # why the run must stop now


class StepGuard:
    def __init__(self, on_nonfinite: str = "skip", max_consecutive_skips: int = 10, spike_zscore: float = 6.0,
                 spike_window: int = 128):
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {on_nonfinite!r}")
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0 (0: never stop), got {max_consecutive_skips}")
        if not spike_zscore >= 0:
            raise ValueError(f"spike_zscore must be >= 0 (0: no spike guard), got {spike_zscore}")
        if spike_window < 2:
            raise ValueError(f"spike_window must be >= 2 losses (a standard deviation needs two), got {spike_window}")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.spike_zscore = spike_zscore
        self.spike_window = spike_window
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.consecutive = 0
        self.skips = dict.fromkeys(SKIP_REASONS, 0)

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        loss, grad_norm = float(loss), float(grad_norm)
        zscore = self._zscore(loss)
        reason = message = stop = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
                   if not math.isfinite(value)]
            reason, message = "nonfinite", f"step {step}: non-finite {' and '.join(bad)}"
            if self.on_nonfinite == "stop":
                stop = f"{message}: stopping (--on-nonfinite stop); the weights were not updated by this step"
        elif self.spike_zscore and zscore is not None and zscore > self.spike_zscore:
            reason = "loss_spike"
            message = (f"step {step}: loss spike {loss:.4f}, z-score {zscore:.1f} > {self.spike_zscore:g} "
                       f"against the last {len(self.losses)} losses")
        if math.isfinite(loss):
            self.losses.append(loss)
        if reason is None:
            self.consecutive = 0
            return Verdict(update=True, zscore=zscore)
        self.skips[reason] += 1
        self.consecutive += 1
        message += ": step skipped"
        if stop is None and self.max_consecutive_skips and self.consecutive >= self.max_consecutive_skips:
            stop = (f"{self.consecutive} steps in a row skipped, the last one at step {step}: stopping "
                    f"(--max-consecutive-skips {self.max_consecutive_skips}); the run has diverged or its data is bad")
        return Verdict(update=False, skip_reason=reason, zscore=zscore, message=message, stop=stop)

    def summary(self) -> str:
        """E.g. ``3 steps skipped (2 non-finite, 1 loss spike)``, or '' when none was."""
        if not self.skipped:
            return ""
        parts = [f"{self.skips['nonfinite']} non-finite", f"{self.skips['loss_spike']} loss spike"]
        return f"{self.skipped} steps skipped ({', '.join(p for p in parts if not p.startswith('0 '))})"

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "consecutive": self.consecutive, "skips": dict(self.skips)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.spike_window)
        self.consecutive = state["consecutive"]
        self.skips = {reason: state["skips"].get(reason, 0) for reason in SKIP_REASONS}

    def _zscore(self, loss: float) -> float | None:
        """The loss's z-score against the window (before the loss joins it); None until the window
        is full or while it has no spread."""
        if len(self.losses) < self.spike_window or not math.isfinite(loss):
            return None
        mean = math.fsum(self.losses) / len(self.losses)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        return (loss - mean) / std if std > 0 else None
