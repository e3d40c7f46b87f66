"""`rlhf compare`: pipeline runs (their MLflow parent runs) side by side in the terminal.

The params that differ come first, then the headline metrics (tasks/parent_run.py). In each metric
row whose better direction is known, the best run is marked `*`. The winner is the run whose best
aligned policy (DPO or PPO) has the highest judge score, then win rate vs SFT, then the lower KL.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tasks import layout

HIGHER_IS_BETTER = ("judge_score", "win_rate_vs_sft", "accuracy")
LOWER_IS_BETTER = ("_loss",)
"""Metric-name endings with a known better direction; others (KL, length, seconds) are not marked."""
ALIGNED = layout.ALIGNED
"""The policies whose judge score picks the winner."""


@dataclass(frozen=True)
class RunView:
    """What one parent run shows: its name, id, params (`group.key` -> str) and headline metrics."""
    name: str
    run_id: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reused: tuple[str, ...] = ()
    """Stages whose metrics were copied from an earlier run."""


def differing_params(runs: list[RunView]) -> list[str]:
    """Param keys whose value is not the same in every run (a missing param counts as a value)."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if neither is."""
    if metric.endswith(HIGHER_IS_BETTER):
        return 1
    if metric.endswith(LOWER_IS_BETTER):
        return -1
    return 0


def best_index(values: list[float | None], sign: int) -> int | None:
    """Index of the best value (first on ties), or None when unmarked: no direction, fewer than two
    values, or all values equal."""
    present = [(v, i) for i, v in enumerate(values) if v is not None]
    if sign == 0 or len(present) < 2 or len({v for v, _ in present}) == 1:
        return None
    return max(present, key=lambda vi: (sign * vi[0], -vi[1]))[1]


def policy_key(run: RunView, model: str) -> tuple[float, float, float] | None:
    """How good an aligned policy of a run is: judge score, then win rate vs SFT, then the smaller
    KL to SFT (the same gain for less drift). None if the run has no judge score for it."""
    m = run.metrics
    if f"eval/{model}/judge_score" not in m:
        return None
    return (m[f"eval/{model}/judge_score"], m.get(f"eval/{model}/win_rate_vs_sft", 0.0),
            -m.get(f"eval/{model}/kl_to_sft", 0.0))


def best_policy(run: RunView) -> tuple[tuple[float, float, float], str] | None:
    """The run's best aligned policy as (its key, its name), or None."""
    keyed = [(policy_key(run, m), m) for m in ALIGNED if policy_key(run, m) is not None]
    return max(keyed) if keyed else None


def winner(runs: list[RunView]) -> int | None:
    """Index of the run with the best aligned policy (`policy_key`); None without scores or on a tie."""
    keys = [best_policy(r) for r in runs]
    present = [(k[0], i) for i, k in enumerate(keys) if k is not None]
    if not present:
        return None
    top = max(k for k, _ in present)
    tied = [i for k, i in present if k == top]
    return tied[0] if len(tied) == 1 else None


def winner_line(runs: list[RunView], win: int | None) -> str:
    if win is not None:
        (score, rate, neg_kl), model = best_policy(runs[win])
        return (f"winner: {runs[win].name} ({runs[win].run_id}): its {model} has judge score {score:.4g}, "
                f"win rate vs SFT {rate:.4g}, KL to SFT {-neg_kl:.4g}")
    if any(best_policy(r) for r in runs) and len(runs) > 1:
        return "winner: none, the best aligned policies tie on judge score, win rate vs SFT and KL to SFT"
    return "winner: none, no run has an evaluation"


def metric_order(key: str) -> tuple:
    """eval/ first, then the RM's held-out accuracy, the stages' final losses, and the seconds last."""
    if key.startswith("eval/"):
        return (0, key)
    if key.startswith("rm/heldout"):
        return (1, key)
    return (3 if key.startswith("time/") else 2, key)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(runs: list[RunView]) -> str:
    """The comparison as aligned text: a header of run names, then `params that differ`, then
    `metrics`, best values marked `*`, and a last line naming the winner."""
    if not runs:
        return "no pipeline runs found\n"
    win = winner(runs)
    header = ["", *[f"{r.name} ({r.run_id[:8]})" + (" [winner]" if i == win else "") for i, r in enumerate(runs)]]
    rows = [header, ["params that differ", *[""] * len(runs)]]
    diff = differing_params(runs)
    for key in diff:
        rows.append([f"  {key}", *[_fmt(r.params.get(key)) for r in runs]])
    if not diff:
        rows.append(["  (none)", *[""] * len(runs)])
    rows.append(["metrics (* best)", *[""] * len(runs)])
    for key in sorted({k for r in runs for k in r.metrics}, key=metric_order):
        values = [r.metrics.get(key) for r in runs]
        best = best_index(values, direction(key))
        rows.append([f"  {key}", *[_fmt(v) + (" *" if i == best else "") for i, v in enumerate(values)]])
    rows.append(["reused stages", *[",".join(r.reused) or "-" for r in runs]])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(winner_line(runs, win))
    return "\n".join(lines) + "\n"


# --- MLflow ----------------------------------------------------------------------------------

def view(run) -> RunView:
    tags = run.data.tags
    reused = tags.get("rlhf.reused_stages", "none")
    return RunView(name=run.info.run_name or run.info.run_id, run_id=run.info.run_id, params=dict(run.data.params),
                   metrics=dict(run.data.metrics), reused=() if reused == "none" else tuple(reused.split(",")))


def find_runs(experiment_id: str, last: int, refs: list[str]) -> list[RunView]:
    """The named runs (run id or run name, newest of that name), in the order given; or the last
    `last` pipeline runs, oldest first."""
    import mlflow

    from rlhf_core.errors import RLHFError

    runs = mlflow.search_runs([experiment_id], filter_string="tags.`rlhf.kind` = 'pipeline'", output_format="list",
                              order_by=["attributes.start_time DESC"], max_results=1000 if refs else last)
    if not refs:
        return [view(r) for r in reversed(runs)]
    views = []
    for ref in refs:
        found = [r for r in runs if ref in (r.info.run_id, r.info.run_name)]
        if not found:
            raise RLHFError(f"no pipeline run with id or name {ref!r} in experiment {experiment_id}")
        views.append(view(found[0]))
    return views
