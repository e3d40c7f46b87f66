"""What a loop shows while it runs: a progress bar and its throughput. Throughput differs from run
to run, so it is reported apart from the metrics (`RunContext.log_timing`, `StageResult.timing`)."""
from __future__ import annotations

import time


class Throughput:
    """Counts tokens since start for tokens/s."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.tokens += int(n)
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def timing(self) -> dict[str, float]:
        """`wall_seconds` and `tokens_per_second` since start: the run's `StageResult.timing`."""
        return {"wall_seconds": self.seconds, "tokens_per_second": self.add(0)}


def progress(stage: str, total: int, start: int, disable: bool = False):
    """A progress bar (`disable`: none, as on every process but the main one)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=stage, mininterval=2.0, dynamic_ncols=True, disable=disable)


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
