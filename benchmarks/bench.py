"""Steady-state throughput and peak memory of the training loops, optionally beside TRL's trainers
on the same model, data and batch size.

    python benchmarks/bench.py                      # pt sft rm dpo ppo, this project's loops
    python benchmarks/bench.py --trl                # and TRL's SFT, Reward and DPO trainers
    python benchmarks/bench.py --stages sft dpo --steps 40 --threads 2

The work is the one FINDINGS.md timed TRL on: a 4-layer, width-128 Llama, a 512-token BPE tokenizer,
batch 8, prompts and responses of 24 words each. Each measurement runs in a fresh process (so its
peak memory is its own), times the steps after `--warmup` warm-up steps, and prints one row:
samples/s (PPO: prompts/s, rollout and update), tokens/s, ms/step, and the process's peak RSS (plus
the CUDA peak on a GPU). Nothing here is asserted; the numbers are for reading and comparing.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("river stone cloud lamp garden window paper violin orange market silver engine winter "
         "harbor pencil forest candle mirror ladder bridge planet rocket valley meadow castle "
         "thunder whisper marble copper island desert canyon glacier jungle prairie summit").split()
STAGES = ("pt", "sft", "rm", "dpo", "ppo")
TRL_STAGES = ("sft", "rm", "dpo")


def sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def build_workdir(root: Path, n: int, seed: int = 0) -> None:
    """Raw JSONL data, a trained tokenizer, a saved base model and the tokenised splits."""
    import torch

    from rlhf_core import formats
    from rlhf_core.config import TokenizeConfig
    from rlhf_core.encoding import tokenize_datasets
    from rlhf_core.modeling import build_tiny_causal_lm, save_model
    from rlhf_core.tokenizer import train_tokenizer

    rng = random.Random(seed)
    raw = root / "raw"
    raw.mkdir(parents=True)
    rows = [{"prompt": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng)} for _ in range(n)]
    (raw / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (raw / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}) + "\n" for r in rows))
    (raw / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    (raw / "pt.txt").write_text("".join(f"{r['prompt']} {r['chosen']}\n" for r in rows))
    convs, prefs = formats.read_conversations(raw / "sft.jsonl"), formats.read_preferences(raw / "pref.jsonl")
    tok = train_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 512)
    torch.manual_seed(seed)
    save_model(build_tiny_causal_lm(model_config(), tok, seed), tok, root / "base")
    tokenize_datasets(tok, TokenizeConfig(max_length=128, block_size=64, max_prompt_length=64, max_response_length=64,
                                          eval_fraction=0.0), root / "tok",
                      pt_docs=formats.read_pt_documents(raw / "pt.txt"), conversations=convs, preferences=prefs,
                      prompts=formats.read_prompts(raw / "prompts.jsonl"))


def model_config():
    from rlhf_core.config import ModelConfig

    return ModelConfig()  # the default tiny Llama: 4 layers, width 128, 4 heads, 512-token vocabulary


class StepClock:
    """Called once per finished step (by our log hook or a TRL callback): keeps the first time per step."""

    def __init__(self):
        self.times: dict[int, float] = {}

    def __call__(self, metrics: dict, step: int) -> None:
        self.times.setdefault(step, time.perf_counter())

    def rate(self, warmup: int) -> tuple[int, float]:
        steps = sorted(self.times)
        timed = [s for s in steps if s >= warmup]
        if len(timed) < 2:
            raise SystemExit("too few steps to time; raise --steps")
        return timed[-1] - timed[0], self.times[timed[-1]] - self.times[timed[0]]


def mean_tokens(root: Path, stage: str) -> float:
    """Tokens one training sample puts through the model (a pair counts both sequences)."""
    from datasets import load_from_disk

    kind = {"pt": "pt", "sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompts"}[stage]
    ds = load_from_disk(str(root / "tok" / kind / "train"))
    if kind == "preference":
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])) / len(ds)
    return sum(len(x) for x in ds[ds.column_names[0]]) / len(ds)


def run_ours(stage: str, root: Path, args, clock: StepClock) -> int:
    """Run our loop for warmup + steps; returns samples per step."""
    from rlhf_core import dpo, lm, ppo, rm
    from rlhf_core.config import DPOConfig, PPOConfig, PTConfig, RMConfig, SFTConfig

    common = dict(max_steps=args.warmup + args.steps, batch_size=args.batch_size, eval_every=0, save_every=0,
                  log_every=1, warmup_steps=0, learning_rate=1e-4, lr_scheduler="constant")
    out, ckpt, data, base, mc = root / "out" / stage, root / "ckpt" / stage, root / "tok", root / "base", model_config()
    if stage == "pt":
        lm.run_pt(PTConfig(**common), mc, data, base, out, ckpt, clock)
    elif stage == "sft":
        lm.run_sft(SFTConfig(**common), mc, data, base, out, ckpt, clock)
    elif stage == "rm":
        rm.run_rm(RMConfig(**common), mc, data, base, out, ckpt, clock)
    elif stage == "dpo":  # a reference forward at every step, as TRL's DPOTrainer with a reference copy
        dpo.run_dpo(DPOConfig(**common, precompute_ref=False), mc, data, base, out, ckpt, clock)
    else:
        cfg = PPOConfig(**{**common, "batch_size": args.batch_size}, rollout_batch_size=2 * args.batch_size,
                        max_new_tokens=24)
        ppo.run_ppo(cfg, mc, data, base, base, out, ckpt, clock)
        return cfg.rollout_batch_size
    return args.batch_size


def run_trl(stage: str, root: Path, args, clock: StepClock) -> int:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from rlhf_core.tokenizer import load_tokenizer

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock({}, state.global_step)

    tok = load_tokenizer(root / "base")
    common = dict(output_dir=str(root / "trl" / stage), per_device_train_batch_size=args.batch_size,
                  max_steps=args.warmup + args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                  logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True,
                  dataloader_num_workers=0, max_length=128, use_cpu=not _cuda())
    raw = root / "raw"
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(root / "base"), processing_class=tok,
                             args=SFTConfig(**common), callbacks=[Clock()],
                             train_dataset=load_dataset("json", data_files=str(raw / "sft.jsonl"), split="train"))
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, processing_class=tok, args=RewardConfig(**common), callbacks=[Clock()],
                                train_dataset=_conversational_pairs(raw / "pref.jsonl"))
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "base"),
                             ref_model=AutoModelForCausalLM.from_pretrained(root / "base"), processing_class=tok,
                             args=DPOConfig(**common), callbacks=[Clock()],
                             train_dataset=_conversational_pairs(raw / "pref.jsonl"))
    trainer.train()
    return args.batch_size


def _conversational_pairs(path: Path):
    from datasets import Dataset

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def child(stage: str, impl: str, root: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    clock = StepClock()
    before = peak_rss_mb()
    per_step = (run_ours if impl == "ours" else run_trl)(stage, root, args, clock)
    steps, seconds = clock.rate(args.warmup)
    tokens = mean_tokens(root, stage) * per_step if stage != "ppo" else float("nan")
    row = {"stage": stage, "impl": impl, "steps": steps, "samples_per_s": steps * per_step / seconds,
           "tokens_per_s": steps * tokens / seconds, "ms_per_step": 1000 * seconds / steps,
           "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}
    if torch.cuda.is_available():
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--trl", action="store_true", help="also time TRL's trainers (sft, rm, dpo) on the same work")
    ap.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "IMPL", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from flows.settings import apply_defaults

    apply_defaults()
    if args.child:
        stage, impl, root = args.child
        print("BENCH " + json.dumps(child(stage, impl, Path(root), args)), flush=True)
        return

    jobs = [(s, "ours") for s in args.stages] + [(s, "trl") for s in args.stages if args.trl and s in TRL_STAGES]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        build_workdir(Path(tmp), args.records)
        for stage, impl in jobs:
            cmd = [sys.executable, __file__, "--child", stage, impl, tmp, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
            if proc.returncode != 0 or not line:
                print(f"{stage}/{impl}: failed (exit {proc.returncode}):\n{proc.stderr[-1500:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][6:]))
            print_row(rows[-1], header=len(rows) == 1)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'stage':6} {'impl':5} {'steps':>5} {'samples/s':>10} {'tokens/s':>10} {'ms/step':>8} "
              f"{'peak RSS MB':>11}{'  CUDA peak MB' if 'cuda_peak_mb' in r else ''}")
    tokens = "-" if r["tokens_per_s"] != r["tokens_per_s"] else f"{r['tokens_per_s']:.0f}"
    cuda = f"  {r['cuda_peak_mb']:13.0f}" if "cuda_peak_mb" in r else ""
    print(f"{r['stage']:6} {r['impl']:5} {r['steps']:5d} {r['samples_per_s']:10.1f} {tokens:>10} "
          f"{r['ms_per_step']:8.1f} {r['peak_rss_mb']:11.0f}{cuda}", flush=True)


if __name__ == "__main__":
    main()
