"""What a training loop is given and what it gives back.

Every loop has one signature, `run(ctx, cfg, model_cfg) -> StageResult`. `cfg` says what to
train (the stage's hyperparameters); the `RunContext` says where and how: the named input and
output paths, the accelerator and precision, this process's share of the data order, the
checkpoint policy (the fingerprint the caller computed, `save_every`, resume), main-process-only
saving and logging, and the stop request. So a loop never builds a path, hashes a file or reads
a global, and sharding the data by process changes the context, not the loop.

Under `accelerate launch` (N processes, DDP averages the gradients over processes):
- data order is shared, sampling is not: every process walks one seeded order of global batches
  and takes its slice (`batches`), while the generators that sampling and dropout draw from are
  seeded `seed + process_index` (`seed`);
- a loss that is normalised by a count (tokens, pair weights) divides by the mean over processes
  of that count (`mean_over_processes`), so that DDP's average of the per-process gradients is the
  gradient of one process on the whole global batch;
- logged metrics are means (counts: sums) over processes, held-out sets are split between the
  processes and their sums added up (`eval_rows`, `sum_over_processes`);
- the stop decision is taken together (a request on any process stops all after the same step),
  only the main process writes, and a checkpoint records how many processes wrote it: resuming
  it with another number is an error naming both.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlhf_core.config import TrainConfig
from rlhf_core.data.batching import index_batches
from rlhf_core.errors import RLHFError
from rlhf_core.training.checkpoint import load_checkpoint, rng_state, save_checkpoint
from rlhf_core.training.modeling import compile_layers, enable_gradient_checkpointing, sparse_tied_embedding_grad
from rlhf_core.training.modeling import save_model as save_pretrained
from rlhf_core.training.optim import (
    make_accelerator,
    make_optimizer,
    make_scheduler,
    seed_everything,
)
from rlhf_core.training.stop import Stopped, StopRequest

LogFn = Callable[[dict, int], None]
"""Tracking callback: `log(metrics, step)`. The library never imports a tracker itself."""

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def no_log(metrics: dict, step: int) -> None:
    pass


@dataclass
class StageResult:
    """What a loop returns. `to_dict()` holds only functions of the stage's inputs and seed;
    what differs from run to run (seconds, throughput, the step a run resumed from) is kept
    apart in `run_record()`, so it never reaches a DVC output."""
    stage: str
    steps: int
    metrics: dict = field(default_factory=dict)
    """Final train metrics and held-out eval metrics (`eval/...`)."""
    timing: dict = field(default_factory=dict)
    """`wall_seconds` and `tokens_per_second` of this run."""
    resumed_from_step: int = 0

    def to_dict(self) -> dict:
        return {"stage": self.stage, "steps": self.steps, "metrics": dict(self.metrics)}

    def run_record(self) -> dict:
        return {**self.timing, "resumed_from_step": self.resumed_from_step}


@dataclass
class Prepared:
    """One trainable model with its optimizer and scheduler, placed by accelerate and restored
    from the stage's last checkpoint when one matches."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    state: dict
    """What `save_checkpoint` / `load_checkpoint` take."""
    start: int
    """First step to run: 0, or the step of the checkpoint resumed from."""


@dataclass
class RunContext:
    """Where and how one stage runs (see the module docstring). Build it with `create`."""
    stage: str
    inputs: dict[str, Path]
    """Named inputs: `data` (the tokenised splits), and as the stage needs them `tokenizer`,
    `init` (the model it starts from) and `reward` (PPO's reward model)."""
    out_dir: Path
    ckpt_dir: Path
    fingerprint: str
    """Identity of the stage's params and input contents, computed by the caller: a checkpoint
    resumes only under the same fingerprint."""
    accelerator: object
    save_every: int = 0
    """Checkpoint every this many steps (0: only when a stop is requested)."""
    train_split: str = "train"
    """The split of the stage's data it trains on (the judge RM trains on `judge`)."""
    log_fn: LogFn = no_log
    """Receives the step metrics (functions of the inputs)."""
    timing_fn: LogFn = no_log
    """Receives the step timings (tokens/s), which differ from run to run."""
    stop: StopRequest = field(default_factory=StopRequest)

    @classmethod
    def create(cls, stage: str, cfg: TrainConfig, inputs: dict, out_dir: str | Path, ckpt_dir: str | Path,
               fingerprint: str, **kwargs) -> RunContext:
        """The context of `stage` trained under `cfg`: its accelerator and precision come from
        `cfg.mixed_precision`, its checkpoint interval from `cfg.save_every`."""
        return cls(stage, {k: Path(v) for k, v in inputs.items() if v is not None}, Path(out_dir), Path(ckpt_dir),
                   fingerprint, make_accelerator(cfg), cfg.save_every, **kwargs)

    # --- where -----------------------------------------------------------------------------

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            raise RLHFError(f"{self.stage}: no '{name}' input was given (inputs: {', '.join(sorted(self.inputs))})")
        return self.inputs[name]

    # --- how: device, precision, processes -------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the forwards compute in under `autocast`."""
        return DTYPES[str(getattr(self.accelerator, "mixed_precision", "no"))]

    def autocast(self):
        """Every forward of the stage (trained or frozen models) runs under this."""
        return self.accelerator.autocast()

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def batches(self, n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
        """This process's micro-batches of row indices, `batch_size` per device.

        Every process walks the same seeded order of global batches of `batch_size *
        num_processes` rows (`index_batches`) and takes its own contiguous slice, so the
        processes see disjoint rows that together make the global batch. With one process this
        is `index_batches(n, batch_size, seed, start)` itself. `start` counts micro-batches."""
        lo = self.process_index * batch_size
        for rows in index_batches(n, batch_size * self.num_processes, seed, start):
            yield rows[lo:lo + batch_size]

    def seed(self, seed: int) -> None:
        """Seed the generators that sampling and dropout draw from with `seed + process_index`:
        processes sample differently, and process 0 draws what a single process would. (What must
        agree, the data order, has its own generator in `batches`; models that DDP wraps start
        from process 0's weights.)"""
        seed_everything(seed + self.process_index)

    def eval_rows(self, n: int) -> list[int]:
        """This process's contiguous share of `n` held-out rows (all of them with one process);
        a share may be empty when n < num_processes."""
        per = -(-n // self.num_processes)
        return list(range(min(n, self.process_index * per), min(n, (self.process_index + 1) * per)))

    # --- values across processes ------------------------------------------------------------

    def _reduce(self, values: dict, op: str) -> dict[str, float]:
        if self.num_processes == 1:
            return {k: float(v) for k, v in values.items()}
        keys = sorted(values)  # the same order on every process
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.accelerator.reduce(t, op).tolist()))

    def sum_over_processes(self, values: dict) -> dict[str, float]:
        """Each value summed over the processes (every process must call this with the same keys)."""
        return self._reduce(values, "sum")

    def mean_over_processes(self, values: dict) -> dict[str, float]:
        """Each value averaged over the processes (every process must call this with the same keys)."""
        return self._reduce(values, "mean")

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in process order (picklable objects)."""
        if self.num_processes == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the processes (for statistics of a global batch, e.g. whitening)."""
        return x if self.num_processes == 1 else self.accelerator.reduce(x, "sum")

    # --- the trainable model and its checkpoint --------------------------------------------

    def prepare(self, model, cfg: TrainConfig) -> Prepared:
        """Optimizer and schedule for `model`, placed by the accelerator, resumed when a
        checkpoint with this context's fingerprint exists."""
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.compile:
            compile_layers(model)
        opt = make_optimizer(model.parameters(), cfg.learning_rate, cfg.weight_decay)
        sched = make_scheduler(opt, cfg)
        model, opt = self.accelerator.prepare(model, opt)
        sparse_tied_embedding_grad(model)
        state = {"models": {"model": self.accelerator.unwrap_model(model)}, "optimizers": {"opt": opt},
                 "schedulers": {"sched": sched}}
        resumed = self.resume(state)
        params = [p for p in model.parameters() if p.requires_grad]
        return Prepared(model, opt, sched, params, state, resumed[0] if resumed else 0)

    def resume(self, state: dict) -> tuple[int, dict] | None:
        """Restore `state` from the checkpoint if its fingerprint is ours: (step, extra), or None.
        A checkpoint written by another number of processes raises a CheckpointError naming both."""
        return load_checkpoint(self.ckpt_dir, self.fingerprint, **state, num_processes=self.num_processes,
                               process_index=self.process_index)

    def stop_signal(self) -> int | None:
        """The signal of a stop requested on any process (the highest), so that all stop together."""
        if self.num_processes == 1:
            return self.stop.signum
        mine = torch.tensor([self.stop.signum or 0], device=self.device)
        signum = int(self.accelerator.gather(mine).max())
        return signum or None

    def end_of_step(self, done: int, total: int, state: dict, extra: dict | None = None) -> None:
        """Checkpoint every `save_every` steps, and at once when a stop was requested (then raise Stopped)."""
        signum = self.stop_signal() if done < total else None
        if signum is not None or (self.save_every and done % self.save_every == 0 and done < total):
            rngs = self.gather([rng_state()])  # every process's generators, in process order
            if self.is_main_process:
                save_checkpoint(self.ckpt_dir, self.fingerprint, done, **state, extra=extra, rng_states=rngs)
            self.accelerator.wait_for_everyone()
        if signum is not None:
            name = signal.Signals(signum).name
            raise Stopped(f"{self.stage}: stopped by {name} after step {done}; its checkpoint is in {self.ckpt_dir}; "
                          "run the same command again to resume from it", signum)

    def save_model(self, model, tokenizer, merge_lora: bool = False) -> None:
        """The trained model to `out_dir`, written by the main process only."""
        if self.is_main_process:
            save_pretrained(self.accelerator.unwrap_model(model), tokenizer, self.out_dir, merge_lora=merge_lora)
        self.accelerator.wait_for_everyone()

    # --- reporting -------------------------------------------------------------------------

    def log(self, metrics: dict, step: int) -> None:
        if self.is_main_process:
            self.log_fn(metrics, step)

    def log_timing(self, timing: dict, step: int) -> None:
        """Rates (tokens/s) summed over the processes: the throughput of the whole run. Every
        process calls this at the same steps."""
        timing = self.sum_over_processes(timing)
        if self.is_main_process:
            self.timing_fn(timing, step)
