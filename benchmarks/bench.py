"""Throughput and peak memory of the training loops beside TRL's trainers on identical work.

    python benchmarks/bench.py --trl --ppo-anchor                  # tiny model (make bench)
    python benchmarks/bench.py --model smollm2 --trl --ppo-anchor  # SmolLM2-135M (make bench MODEL=smollm2)
    python benchmarks/bench.py --stages sft dpo --variants full lora --steps 40 --json rows.json

Identical work: both sides get the same model, the same token ids (SFT and RM rows hand TRL our
tokenised data; DPO hands it the same chats, which its template turns into the same ids), the
same batch, sequence length, learning rate, optimiser, LoRA settings, precision (fp32 unless
`--bf16`) and gradient checkpointing (off unless `--gradient-checkpointing`). TRL 1.16's configs
default to bf16=True and gradient_checkpointing=True; both are set explicitly here, and every
setting is printed in the table header with the CPU and whether it has native bf16.

Each measurement runs in its own process (so its peak RSS is its own), times the steps after
`--warmup` warm-up steps, and reports samples/s (PPO: prompts/s through rollout and update),
tokens/s (real tokens put through the trained model: padding excluded), ms/step and peak RSS
(plus the CUDA peak on a GPU). The ratios to TRL are printed at the end of the same run.

Each SFT, RM and DPO row also gets a floor: the matrix products its layout needs at this machine's
own measured product rate, plus one optimizer step over its trainable values, measured the same
way (`machine_rates`, in a child process before the rows). The floor is a best case, so a
reference's ms/step over its floor is the ceiling on any ratio against it on that work: where the
ceiling is below the target, no loop doing that work meets it on this machine.

The PPO anchor is TRL's last release with a first-class PPOTrainer (0.25.1; 0.26 moved it to
`trl.experimental`, 1.x removed it). It runs in its own virtual environment,
benchmarks/.venv-ppo-anchor, built on first use, on the same model, prompts, rollout size,
response length, epochs and minibatches. Nothing here is asserted; the numbers are for reading.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("river stone cloud lamp garden window paper violin orange market silver engine winter "
         "harbor pencil forest candle mirror ladder bridge planet rocket valley meadow castle "
         "thunder whisper marble copper island desert canyon glacier jungle prairie summit").split()
STAGES = ("pt", "sft", "rm", "dpo", "ppo")
TRL_STAGES = ("sft", "rm", "dpo")
SMOLLM2_DIR = ROOT / "models" / "base" / "smollm2-135m-instruct"
SMOLLM2_CACHE = Path.home() / ".cache" / "rlhf-pipeline" / "smollm2-135m-instruct"

# One preset per model size: the work both sides do.
PRESETS = {
    "tiny": dict(stages=list(STAGES), variants=["full"], batch_size=8, steps=30, warmup=5, records=512,
                 max_length=128, ppo_new_tokens=24),
    "smollm2": dict(stages=["sft", "rm", "dpo", "ppo"], variants=["full", "lora"], batch_size=2, steps=3, warmup=1,
                    records=48, max_length=256, ppo_new_tokens=24),
}
LORA = dict(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
LEARNING_RATE = 1e-4
PPO_EPOCHS = 2

ANCHOR_VENV = ROOT / "benchmarks" / ".venv-ppo-anchor"
ANCHOR_PINS = ("trl==0.25.1", "transformers==4.57.6", "accelerate>=1.4,<2", "datasets>=3,<5")
ANCHOR_TORCH = "torch==2.13.0"  # first, so pip takes the local CPU wheel rather than a CUDA build


# --- data ------------------------------------------------------------------------------------

def sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def varied_words(rng: random.Random, low: int, high: int) -> int:
    """A long-tailed length, as real chat turns have: most short, a few long."""
    return min(high, low + int(rng.expovariate(1.0 / max(1, (high - low) / 3))))


def raw_records(model: str, n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(sft records in ShareGPT form, preference records in TRL's {prompt, chosen, rejected} form).

    tiny: every prompt and response 24 words (the work FINDINGS.md timed TRL on). smollm2: lengths
    vary (prompt 4-60 words, responses 4-90 words), so batches carry real padding; the caps keep
    every record under max_length, so no side truncates."""
    rng = random.Random(seed)
    sft, pref = [], []
    for _ in range(n):
        if model == "tiny":
            p, c, r = sentence(rng), sentence(rng), sentence(rng)
        else:
            p, c, r = (sentence(rng, varied_words(rng, 4, lim)) for lim in (60, 90, 90))
        sft.append({"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]})
        pref.append({"prompt": p, "chosen": c, "rejected": r})
    return sft, pref


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_workdir(root: Path, model: str, model_path: Path | None, n: int, max_length: int, seed: int = 0,
                  random_init: bool = False) -> Path:
    """Raw JSONL data, the base model (built for tiny; the given folder for smollm2, or with
    `random_init` its architecture from config.json with seeded random weights) and the tokenised
    splits; returns the base model's folder."""
    import torch

    from rlhf_core.config import TokenizeConfig
    from rlhf_core.data import formats
    from rlhf_core.data.encoding import tokenize_datasets
    from rlhf_core.data.tokenizer import load_tokenizer, train_tokenizer
    from rlhf_core.training.modeling import build_tiny_causal_lm, save_model

    raw = root / "raw"
    raw.mkdir(parents=True)
    sft, pref = raw_records(model, n, seed)
    write_jsonl(raw / "sft.jsonl", sft)
    write_jsonl(raw / "pref.jsonl", pref)
    write_jsonl(raw / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pref])
    (raw / "pt.txt").write_text("".join(f"{r['prompt']} {r['chosen']}\n" for r in pref))
    if model == "tiny":
        tok = train_tokenizer([r[k] for r in pref for k in ("prompt", "chosen", "rejected")], 512)
        torch.manual_seed(seed)
        base = root / "base"
        save_model(build_tiny_causal_lm(model_config("tiny", None), tok, seed), tok, base)
    elif random_init:
        base, tok = root / "base", load_tokenizer(model_path)
        save_model(random_causal_lm(model_path, seed), tok, base)
    else:
        base, tok = model_path, load_tokenizer(model_path)
    half = max_length // 2
    tokenize_datasets(tok, TokenizeConfig(max_length=max_length, block_size=64, max_prompt_length=half,
                                          max_response_length=half, eval_fraction=0.0), root / "tok",
                      pt_docs=formats.read_pt_documents(raw / "pt.txt"),
                      conversations=formats.read_conversations(raw / "sft.jsonl"),
                      preferences=formats.read_preferences(raw / "pref.jsonl"),
                      prompts=formats.read_prompts(raw / "prompts.jsonl"))
    return base


def random_causal_lm(model_path: Path, seed: int):
    """The architecture of `model_path/config.json` with seeded random fp32 weights: for a host that
    has the config and tokenizer but not the weights (a GPU worker with no hub access). Steps cost
    the same whatever the weights' values: the token ids, lengths and batches are the same."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)


def model_config(model: str, model_path: str | None):
    from rlhf_core.config import ModelConfig

    if model == "tiny":
        return ModelConfig()  # the default tiny Llama: 4 layers, width 128, 4 heads, 512-token vocabulary
    return ModelConfig(name_or_path=str(model_path), dtype="float32")


DATA_KIND = {"pt": "pt", "sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompts"}


def row_lengths(stage: str, cols: dict) -> list[list[int]]:
    """Per training sample, the lengths of the sequences it puts through the model (a pair: the
    chosen and the rejected sequence; PPO: the prompt only, responses are sampled)."""
    if DATA_KIND[stage] == "preference":
        return [[len(p) + len(c), len(p) + len(r)] for p, c, r in zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]
    key = "prompt_ids" if stage == "ppo" else "input_ids"
    return [[len(x)] for x in cols[key]]


def drawn_rows(n: int, batch_size: int, n_batches: int, seed: int = 0) -> list[int]:
    """The rows our loop trains on, in its order: its first `n_batches` micro-batches
    (`index_batches` with the configs' seed, 0). TRL's trainers get exactly these rows with a
    sequential sampler, so both sides train the same batches: with varied lengths and a small batch,
    each side drawing its own random batches would put different numbers of tokens through the model."""
    from rlhf_core.data.batching import index_batches

    order = index_batches(n, batch_size, seed)
    return [i for _ in range(n_batches) for i in next(order)]


LAYOUTS = ("padded", "end_to_end", "shared_prompt", "shared_prompt_one_row")
"""How our side lays a batch out: right-padded to the longest row; rows end to end (`padding_free`);
each pair's prompt once, one padded row per pair or all pairs in one row (`rm.share_prompt`)."""


def padding_stats(stage: str, root: Path, batch_size: int, n_batches: int, seed: int = 0,
                  layout: str = "padded") -> dict:
    """Real tokens per sample (a pair counts its prompt twice, whatever the layout), the share of
    padding in the batches our loop draws as `layout` lays them out, and those rows (`drawn_rows`,
    what TRL gets). Padded batches are padded to their longest row, as TRL's collators do."""
    from datasets import load_from_disk

    ds = load_from_disk(str(root / "tok" / DATA_KIND[stage] / "train"))
    cols = ds[:]
    lengths = row_lengths(stage, cols)
    through = lengths  # the rows the model sees
    if layout.startswith("shared_prompt"):
        through = [[len(p) + len(c) + len(r)] for p, c, r in zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]
    rows = drawn_rows(len(lengths), batch_size, n_batches, seed)
    real = seen = slots = 0
    for j in range(0, len(rows), batch_size):
        batch = rows[j:j + batch_size]
        seqs = [n for i in batch for n in through[i]]
        real += sum(n for i in batch for n in lengths[i])
        seen += sum(seqs)
        slots += sum(seqs) if layout in ("end_to_end", "shared_prompt_one_row") else len(seqs) * max(seqs)
    return {"tokens_per_sample": real / len(rows), "padding_fraction": 1 - seen / slots, "rows": rows}


def our_layout(stage: str, impl: str, args) -> str:
    """The `LAYOUTS` entry a row's batches take (TRL pads its pairs; SFT padding-free is on both sides)."""
    if stage == "sft" and args.padding_free:
        return "end_to_end"
    if stage == "ppo" and impl == "ours" and args.ppo_padding_free:
        return "end_to_end"
    if stage not in ("rm", "dpo") or impl != "ours":
        return "padded"
    if stage == "rm" and args.rm_share_prompt:
        return "shared_prompt_one_row" if args.pairs_padding_free else "shared_prompt"
    return "end_to_end" if args.pairs_padding_free else "padded"


# --- model FLOPs of a step, for MFU on a GPU --------------------------------------------------

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1}
"""Dense bf16 tensor-core peaks (no sparsity) from the vendor's datasheets, by device-name substring
(SXM parts; a PCIe H100 is lower: pass --peak-tflops)."""


def arch_of(model_dir: Path) -> dict:
    """The sizes the FLOPs depend on, from a Llama-style config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c["num_attention_heads"]
    return {"d": c["hidden_size"], "layers": c["num_hidden_layers"], "heads": heads,
            "kv_heads": c.get("num_key_value_heads") or heads, "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "ffn": c["intermediate_size"], "vocab": c["vocab_size"], "tied": bool(c.get("tie_word_embeddings", False))}


def sequence_shapes(stage: str, cols: dict) -> list[list[tuple[int, int]]]:
    """Per training sample, (tokens, scored positions) of each sequence it puts through the model:
    SFT scores the positions that predict a trained label; a pair's sequences are prompt + response,
    DPO scoring the response's positions, RM none (one score at the end)."""
    if DATA_KIND[stage] == "preference":
        scored = stage == "dpo"
        return [[(len(p) + len(c), len(c) * scored), (len(p) + len(r), len(r) * scored)]
                for p, c, r in zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]
    return [[(len(ids), sum(1 for y in labels[1:] if y != -100))] for ids, labels in zip(cols["input_ids"], cols["labels"])]


def trunk_weights(a: dict) -> int:
    """The weights of the layers' linear maps (q, k, v, o and the gated MLP's three), all layers."""
    d, h, kv, hd = a["d"], a["heads"], a["kv_heads"], a["head_dim"]
    return a["layers"] * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * a["ffn"])


def adapter_widths(a: dict) -> int:
    """(in + out) of each LoRA target (q, k, v, o), summed over all layers: r times it is the adapters'
    parameter count."""
    d, h, kv, hd = a["d"], a["heads"], a["kv_heads"], a["head_dim"]
    return a["layers"] * (d + h * hd + 2 * (d + kv * hd) + h * hd + d)


def sample_flops(stage: str, lora: bool, a: dict, shapes: list[tuple[int, int]]) -> float:
    """Model FLOPs one training sample needs (matrix products; what the task needs, not what an
    implementation spends: no padding, no projection to the vocabulary at unscored positions, and
    the last layer only where its output is read).

    Forward of a sequence of T tokens with S scored positions, R of them read (S; RM: 1, its
    score): 2 * (trunk weights) * T in the linear layers, less the last layer's q, o and MLP at the
    T - R positions nobody reads; 2 * heads * head_dim * T * (T + 1) per layer in causal attention
    (QK^T and AV over the T(T+1)/2 visible pairs), the last layer's R queries (the last R
    positions) over R * (2T - R + 1) / 2 pairs; 2 * d * vocab * S in the LM head (RM: 2 * d for
    its one score). Training: forward + backward = 3x forward for a full fine-tune. With LoRA the
    frozen weights get no gradient, so the linear layers and the head cost 2x forward, attention
    (no weights) still 3x, plus the adapters' own 6 * r * (in + out) per token where they run,
    less the input gradients of the first layer's q, k and v projections (base and adapter), which
    nothing needs. DPO adds the reference's forward (1x). rm.share_prompt's rows still count each
    prompt twice (the task as padded pairs)."""
    d, L, h, kv, hd = a["d"], a["layers"], a["heads"], a["kv_heads"], a["head_dim"]
    trunk, adapter = trunk_weights(a), adapter_widths(a)
    last_read = 2 * d * h * hd + 3 * d * a["ffn"]  # the last layer's q, o and MLP weights
    last_read_adapter = 2 * (d + h * hd)  # its q and o adapters' (in + out)
    first_qkv = d * (h * hd + 2 * kv * hd) + 3 * LORA["r"] * d  # layer 0's q, k, v input gradients
    assert LORA["target_modules"] == ("q_proj", "k_proj", "v_proj", "o_proj"), "adapter FLOPs count these four"
    total = 0.0
    for T, S in shapes:
        R = 1 if stage == "rm" else S
        linear = 2 * (trunk - last_read) * T + 2 * last_read * R
        attention = 2 * h * hd * ((L - 1) * T * (T + 1) + R * (2 * T - R + 1))
        head = 2 * d if stage == "rm" else 2 * d * a["vocab"] * S
        if lora:
            adapters = 6 * LORA["r"] * ((adapter - last_read_adapter) * T + last_read_adapter * R)
            total += 2 * (linear + head) + 3 * attention + adapters - 2 * first_qkv * T
        else:
            total += 3 * (linear + attention + head)
        if stage == "dpo":
            total += linear + attention + head
    return total


def timed_step_flops(stage: str, variant: str, root: Path, base: Path, rows: list[int], batch_size: int,
                     warmup: int, steps: int, layout: str = "end_to_end") -> float | None:
    """Mean model FLOPs of the timed steps (micro-batches warmup .. warmup + steps - 1 of `rows`,
    `drawn_rows`' order); None for PT and PPO (generation), which it does not count.

    `layout` "end_to_end" counts the real tokens (what the task needs: MFU); "padded" counts every
    sequence at its micro-batch's longest length, as a right-padded batch puts it through the model
    (the pad positions go through every layer; the LM head still only at the scored positions, which
    any loop may choose): the products a loop must do on padded work. Other layouts: None."""
    if stage not in ("sft", "rm", "dpo") or layout not in ("end_to_end", "padded"):
        return None
    from datasets import load_from_disk

    ds = load_from_disk(str(root / "tok" / DATA_KIND[stage] / "train"))
    shapes = sequence_shapes(stage, ds[:])
    a = arch_of(base)
    timed = rows[warmup * batch_size:(warmup + steps) * batch_size]
    total = 0.0
    for j in range(0, len(timed), batch_size):
        batch = [shapes[i] for i in timed[j:j + batch_size]]
        if layout == "padded":
            longest = max(T for sample in batch for T, _ in sample)
            batch = [[(longest, S) for _, S in sample] for sample in batch]
        total += sum(sample_flops(stage, variant == "lora", a, sample) for sample in batch)
    return total / steps


def add_mfu(row: dict, flops_per_step: float | None, peak_tflops: float | None) -> dict:
    """Achieved model TFLOP/s and MFU (against `peak_tflops`) of a measured row."""
    if flops_per_step is None:
        return row
    row["model_tflops"] = flops_per_step / (row["ms_per_step"] / 1000) / 1e12
    if peak_tflops:
        row["mfu"] = row["model_tflops"] / peak_tflops
    return row


def peak_tflops_for(args) -> float | None:
    """--peak-tflops, else the bf16 datasheet peak of the CUDA device when --bf16; None on a CPU."""
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if not (args.bf16 and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


# --- the floor of a step on this machine, and the ceiling it puts on any ratio -----------------

def trainable_values(stage: str, lora: bool, a: dict) -> int:
    """How many values the optimizer steps: the whole model for a full fine-tune (a causal LM's
    embedding and head once if tied; a reward model's embedding and one-output score head), the
    adapters on q, k, v, o with LoRA (and a reward model's score head, which peft trains with them)."""
    d = a["d"]
    score = d if stage == "rm" else 0
    if lora:
        return LORA["r"] * adapter_widths(a) + score
    norms = (2 * a["layers"] + 1) * d
    embeddings = a["vocab"] * d * (1 if a["tied"] or stage == "rm" else 2)
    return embeddings + trunk_weights(a) + norms + score


def machine_rates(threads: int, bf16: bool, counts: list[int], shapes: list[tuple[int, int, int]]) -> dict:
    """This machine's own rates, measured in this process (`--rates-child`): the matrix-product rate
    in FLOP/s (the best of a few repeats over a 2048-square product and `shapes`, the model's own
    (rows, in, out) products at 1024 rows; fp32, or bf16 under --bf16) and, for each trainable count,
    the ms of one clip-to-1.0 and fused AdamW step over one flat tensor of that many fp32 values
    (fewer tensors than a model has: a lower bound of the optimizer's time). Both are best cases,
    so a floor built from them is one no loop goes below."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32

    def best_seconds(fn, repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    rate = 0.0
    for m, k, n in [(2048, 2048, 2048), *shapes]:
        x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        rate = max(rate, 2 * m * k * n / best_seconds(lambda: torch.mm(x, w), 10))
    optimizer_ms = {}
    for count in counts:
        p = torch.nn.Parameter(torch.zeros(count, device=device))
        p.grad = torch.randn(count, device=device)
        opt = torch.optim.AdamW([p], lr=LEARNING_RATE, betas=(0.9, 0.95), fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_([p], 1.0)
            opt.step()

        optimizer_ms[str(count)] = 1000 * best_seconds(step, 5)
    return {"matmul_flops_per_s": rate, "optimizer_ms": optimizer_ms, "dtype": str(dtype).removeprefix("torch.")}


def measure_rates(args, a: dict) -> dict | None:
    """`machine_rates` in a child process with the rows' environment and thread count, for the
    stages and variants this run times (SFT, RM, DPO); None when none of them is timed."""
    counted = [(s, v) for s in args.stages if s in TRL_STAGES for v in args.variants]
    if not counted:
        return None
    counts = sorted({trainable_values(s, v == "lora", a) for s, v in counted})
    shapes = [(1024, a["d"], a["ffn"]), (1024, a["ffn"], a["d"]), (1024, a["d"], a["heads"] * a["head_dim"])]
    spec = {"threads": args.threads, "bf16": args.bf16, "counts": counts, "shapes": shapes}
    proc = subprocess.run([sys.executable, __file__, "--rates-child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not line:
        print(f"machine rates: failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[0][6:])


def add_floor(row: dict, layout_flops: float | None, trainable: int, rates: dict | None) -> dict:
    """A row's floor: its layout's matrix products at the measured rate plus one optimizer step
    over its trainable values, in ms, and the share of the measured step it makes up."""
    if layout_flops is None or rates is None:
        return row
    floor = 1000 * layout_flops / rates["matmul_flops_per_s"] + rates["optimizer_ms"][str(trainable)]
    row["floor_ms"], row["floor_share"] = floor, floor / row["ms_per_step"]
    return row


def ceiling(reference: dict) -> float | None:
    """How many times the reference's speed any loop doing the reference's work could reach on
    this machine: its measured ms/step over its floor. A target above it cannot be met on that work."""
    return reference["ms_per_step"] / reference["floor_ms"] if "floor_ms" in reference else None


def floor_line(rates: dict) -> str:
    """The header line that says what a row's floor is and what was measured for it."""
    opt = ", ".join(f"{int(n):,} values {ms:.1f} ms" for n, ms in rates["optimizer_ms"].items())
    return (f"# floor: a step's matrix products (sample_flops over the row's own layout: padded rows at their batch's "
            f"longest length, rows end to end at their real length) at this machine's measured {rates['dtype']} "
            f"product rate, {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (best of a 2048-square and the model's "
            f"own shapes at 1024 rows), plus one clip and fused AdamW step over the trainable values ({opt}; one "
            "flat tensor, best of 5); floor % = floor / ms per step. The ceiling on a reference's work = its ms per "
            "step / its floor: no loop doing that work runs faster on this machine")


# --- one measurement (a child process) -------------------------------------------------------

class StepClock:
    """Called once per finished step (by our log hook or a TRL callback): keeps the first time per
    step. With `profile` = (file, first, last) it runs torch's profiler from the end of step `first`
    to the end of step `last` (the timed steps) and writes its per-op table to the file."""

    def __init__(self, profile: tuple[Path, int, int] | None = None):
        self.times: dict[int, float] = {}
        self.profile, self.profiler = profile, None

    def __call__(self, metrics: dict, step: int) -> None:
        import torch

        if torch.cuda.is_available():  # the step's kernels have finished, not just been queued
            torch.cuda.synchronize()
        self.times.setdefault(step, time.perf_counter())
        if self.profile and step == self.profile[1] and self.profiler is None:
            from torch.profiler import ProfilerActivity, profile

            gpu = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self.profiler = profile(activities=[ProfilerActivity.CPU, *gpu], profile_memory=True, record_shapes=True)
            self.profiler.__enter__()
        elif self.profiler is not None and step == self.profile[2]:
            self.profiler.__exit__(None, None, None)
            by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            ops = self.profiler.key_averages()
            shapes = self.profiler.key_averages(group_by_input_shape=True)
            Path(self.profile[0]).write_text(
                f"# {self.profile[2] - self.profile[1]} steps, sorted by {by}\n"
                f"{ops.table(sort_by=by, row_limit=60, max_name_column_width=60)}\n"
                f"# by op and input shapes\n{shapes.table(sort_by=by, row_limit=60, max_name_column_width=60)}\n")
            self.profiler = None

    def rate(self, warmup: int) -> tuple[int, float]:
        timed = [s for s in sorted(self.times) if s >= warmup]
        if len(timed) < 2:
            raise SystemExit("too few steps to time; raise --steps")
        return timed[-1] - timed[0], self.times[timed[-1]] - self.times[timed[0]]

    def step_ms(self, warmup: int) -> list[float]:
        """Each timed step's own duration in ms (between consecutive finished steps from `warmup` on;
        a step logged after a gap counts as the gap's mean), so a row shows how much the steps of one
        process spread on a shared machine, not only their mean."""
        timed = [s for s in sorted(self.times) if s >= warmup]
        return [1000 * (self.times[b] - self.times[a]) / (b - a) for a, b in zip(timed, timed[1:])]


def run_ours(spec: dict, clock: StepClock) -> int:
    """Run our loop for warmup + steps; returns samples per step."""
    from rlhf_core.config import DPOConfig, LoraConfig, PPOConfig, PTConfig, RMConfig, SFTConfig
    from rlhf_core.stages import dpo, lm, ppo, rm
    from rlhf_core.training.context import RunContext

    stage, root = spec["stage"], Path(spec["root"])
    lora = LoraConfig(enabled=spec["variant"] == "lora", r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"])
    common = dict(max_steps=spec["warmup"] + spec["steps"], batch_size=spec["batch_size"], eval_every=0, save_every=0,
                  log_every=1, warmup_steps=0, learning_rate=LEARNING_RATE, lr_scheduler="constant",
                  mixed_precision="bf16" if spec["bf16"] else "no", gradient_checkpointing=spec["gradient_checkpointing"],
                  lora=lora, compile=bool(spec.get("compile")))
    base = Path(spec["base"])
    mc = model_config(spec["model"], spec["base"])
    if spec.get("no_varlen"):
        from rlhf_core.training import modeling

        modeling.varlen_kernel = lambda query, kwargs: None
    if stage == "ppo":
        cfg = PPOConfig(**common, rollout_batch_size=2 * spec["batch_size"], max_new_tokens=spec["ppo_new_tokens"],
                        ppo_epochs=PPO_EPOCHS, temperature=1.0, critic_learning_rate=LEARNING_RATE,
                        padding_free=spec.get("ppo_padding_free", False),
                        sampling_logprobs=True)  # as the anchor: old log-probs from the generation logits
    else:  # DPO: a reference forward at every step, as TRL's DPOTrainer does by default
        pairs_free = spec.get("pairs_padding_free", False)
        cfg = {"pt": PTConfig(**common), "sft": SFTConfig(**common, padding_free=spec["padding_free"]),
               "rm": RMConfig(**common, padding_free=pairs_free, share_prompt=spec.get("rm_share_prompt", False)),
               "dpo": DPOConfig(**common, precompute_ref=False, padding_free=pairs_free)}[stage]
    loop = {"pt": lm.run_pt, "sft": lm.run_sft, "rm": rm.run_rm, "dpo": dpo.run_dpo, "ppo": ppo.run_ppo}[stage]
    inputs = {"data": root / "tok", "tokenizer": base, "init": base, "reward": base}
    loop(RunContext.create(stage, cfg, inputs, root / "out" / stage, root / "ckpt" / stage, f"bench-{stage}",
                           log_fn=clock), cfg, mc)
    return cfg.rollout_batch_size if stage == "ppo" else spec["batch_size"]


def trl_sft_rows(root: Path, rows: list[int]):
    """Our tokenised SFT split's `rows` (`drawn_rows`) as TRL's processed form: input_ids and labels
    (-100 off the reply)."""
    from datasets import Dataset, load_from_disk

    ds = load_from_disk(str(root / "tok" / "sft" / "train")).select(rows)
    return Dataset.from_dict({"input_ids": ds["input_ids"], "labels": ds["labels"]})


def trl_rm_rows(root: Path, rows: list[int]):
    """Our tokenised pairs' `rows` as TRL's processed reward form: chosen_ids / rejected_ids, prompt included."""
    from datasets import Dataset, load_from_disk

    ds = load_from_disk(str(root / "tok" / "preference" / "train")).select(rows)
    return Dataset.from_dict({"chosen_ids": [p + c for p, c in zip(ds["prompt_ids"], ds["chosen_ids"])],
                              "rejected_ids": [p + r for p, r in zip(ds["prompt_ids"], ds["rejected_ids"])]})


def trl_dpo_rows(root: Path, rows: list[int]):
    """The same pairs' `rows` as conversations; TRL 1.16's DPOTrainer takes no pre-tokenised data,
    so its template renders them (the row's tokens_per_sample shows whether the ids came out the
    same). Our split keeps every record in file order (`eval_fraction` 0, nothing dropped), so row i
    of the split is line i of pref.jsonl."""
    from datasets import Dataset, load_from_disk

    records = [json.loads(line) for line in (root / "raw" / "pref.jsonl").read_text().splitlines()]
    if len(records) != len(load_from_disk(str(root / "tok" / "preference" / "train"))):
        raise SystemExit("bench: the tokenised preference split dropped records, so its rows are not pref.jsonl's")
    return Dataset.from_list([{"prompt": [{"role": "user", "content": records[i]["prompt"]}],
                               "chosen": [{"role": "assistant", "content": records[i]["chosen"]}],
                               "rejected": [{"role": "assistant", "content": records[i]["rejected"]}]} for i in rows])


def trl_config_kwargs(spec: dict) -> dict:
    """Everything that makes TRL's work ours, set explicitly (TRL 1.16 defaults to bf16=True and
    gradient_checkpointing=True in SFTConfig, RewardConfig and DPOConfig)."""
    import torch

    stage = spec["stage"]
    kw = dict(output_dir=str(Path(spec["root"]) / "trl" / stage), per_device_train_batch_size=spec["batch_size"],
              gradient_accumulation_steps=1, max_steps=spec["warmup"] + spec["steps"], learning_rate=LEARNING_RATE,
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
              max_grad_norm=1.0, optim="adamw_torch_fused", bf16=spec["bf16"], fp16=False,
              gradient_checkpointing=spec["gradient_checkpointing"], max_length=spec["max_length"],
              pad_to_multiple_of=None, logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True,
              dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0,
              train_sampling_strategy="sequential",  # the rows come in our loop's order (drawn_rows)
              torch_compile=bool(spec.get("compile")))
    if spec["gradient_checkpointing"]:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}  # as ours
    if stage in ("sft", "dpo"):
        kw["padding_free"] = stage == "sft" and spec["padding_free"]
        if kw["padding_free"]:
            kw["max_length"] = None  # TRL's demand with padding_free; our split is already truncated to max_length
    if stage == "sft":
        kw["packing"] = False
    if stage == "dpo":
        kw.update(precompute_ref_log_probs=False, beta=0.1, loss_type=["sigmoid"])
    return kw


def trl_peft_config(spec: dict, task_type: str):
    if spec["variant"] != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=list(LORA["target_modules"]), task_type=task_type)


def run_trl(spec: dict, clock: StepClock) -> tuple[int, float]:
    """Run TRL 1.16's trainer; returns (samples per step, real tokens per sample in its own data)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from rlhf_core.data.tokenizer import load_tokenizer

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock({}, state.global_step)

    stage, root, base = spec["stage"], Path(spec["root"]), spec["base"]
    if spec.get("compile"):
        # as ours (`compile: true` compiles with dynamic=True): shapes dynamic from the first compilation.
        # TRL's Trainer compiles with dynamic=None, which compiles static shapes first and recompiles
        # when they change: with rows end to end every step's length is new, so its second step compiled
        # the whole model again (125 s on 2 CPU cores for SmolLM2, inside the timed steps)
        torch._dynamo.config.assume_static_by_default = False
    tok = load_tokenizer(base)
    kw = trl_config_kwargs(spec)
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), processing_class=tok,
                             args=SFTConfig(**kw), callbacks=[Clock()], train_dataset=trl_sft_rows(root, spec["rows"]),
                             peft_config=trl_peft_config(spec, "CAUSAL_LM"))
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, processing_class=tok, args=RewardConfig(**kw), callbacks=[Clock()],
                                train_dataset=trl_rm_rows(root, spec["rows"]), peft_config=trl_peft_config(spec, "SEQ_CLS"))
    else:
        from trl import DPOConfig, DPOTrainer

        ref = None if spec["variant"] == "lora" else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ref_model=ref,
                             processing_class=tok, args=DPOConfig(**kw), callbacks=[Clock()],
                             train_dataset=trl_dpo_rows(root, spec["rows"]), peft_config=trl_peft_config(spec, "CAUSAL_LM"))
    if len(trainer.train_dataset) != len(spec["rows"]):  # TRL filtered some: its batches would not be ours
        raise SystemExit(f"bench: TRL's {stage} trainer kept {len(trainer.train_dataset)} of our {len(spec['rows'])} "
                         "drawn rows, so its batches would differ from ours")
    trainer.train()
    return spec["batch_size"], trl_tokens_per_sample(stage, trainer.train_dataset)


def trl_tokens_per_sample(stage: str, ds) -> float:
    cols = {k: ds[k] for k in ds.column_names}
    if stage == "rm":
        lengths = [[len(c), len(r)] for c, r in zip(cols["chosen_ids"], cols["rejected_ids"])]
    else:
        lengths = row_lengths(stage, cols)
    return sum(map(sum, lengths)) / len(lengths)


def peak_rss_mb(status: str | None = None) -> float:
    """This process's own peak RSS: Linux's VmHWM, the high-water mark of the memory the process
    has had since its exec. Not getrusage's ru_maxrss: Linux carries that across fork and exec,
    so a row's process reported at least the parent harness's RSS when it was started (495 MB of
    the tiny rows' ~550-600 MB on 2026-12-07), for ours and the references' alike. `status`: the
    text of /proc/self/status (read when not given); elsewhere, ru_maxrss."""
    mb = proc_status_mb("VmHWM", status)
    if mb is not None:
        return mb
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def file_rss_mb(status: str | None = None) -> float | None:
    """The file-backed part of this process's RSS now (Linux's RssFile: shared libraries, mapped
    files), or None where /proc has no such line. Part of every peak, and not the training's own
    memory: the same library files can map more of it in one install than in another, as the page
    cache holds them (`import torch` alone, 2026-12-07: 74-77 MB of file pages from this
    workspace's venv, 112 and 98 MB from two fresh clones' venvs, 75 MB from an anchor venv built
    from the same wheel ten minutes after the second; the same ~144 MB of anonymous memory)."""
    return proc_status_mb("RssFile", status)


def proc_status_mb(key: str, status: str | None = None) -> float | None:
    """A kB line of /proc/self/status (`status`: its text, read when not given) in MB, or None."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return None
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    profile = None
    if spec.get("profile_dir"):
        name = f"{spec['stage']}-{spec['variant']}-{spec['impl']}.txt"
        profile = (Path(spec["profile_dir"]) / name, spec["warmup"], spec["warmup"] + spec["steps"])
    clock = StepClock(profile)
    before = peak_rss_mb()
    if spec["impl"] == "ours":
        per_step, tokens = run_ours(spec, clock), spec["tokens_per_sample"]
    else:
        per_step, tokens = run_trl(spec, clock)
    steps, seconds = clock.rate(spec["warmup"])
    row = measured_row(spec, steps, seconds, per_step, tokens, before, clock.step_ms(spec["warmup"]))
    if torch.cuda.is_available():
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def measured_row(spec: dict, steps: int, seconds: float, per_step: int, tokens_per_sample: float | None,
                 rss_before: float, step_ms: list[float] | None = None) -> dict:
    tokens = float("nan") if tokens_per_sample is None else tokens_per_sample * per_step
    spread = {"step_ms_min": min(step_ms), "step_ms_max": max(step_ms)} if step_ms else {}
    return {**spread, "model": spec["model"], "stage": spec["stage"], "variant": spec["variant"], "impl": spec["impl"],
            "steps": steps, "samples_per_step": per_step, "samples_per_s": steps * per_step / seconds,
            "tokens_per_sample": tokens_per_sample, "tokens_per_s": steps * tokens / seconds,
            "ms_per_step": 1000 * seconds / steps, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
            "file_rss_mb": file_rss_mb(),
            "padding_fraction": spec.get("padding_fraction")}


# --- the PPO anchor: TRL 0.25.1's PPOTrainer in its own venv ------------------------------------

def anchor_python(log=print) -> Path:
    """The anchor venv's python; the venv is built on first use (and rebuilt if its pins change).
    It is created with this interpreter's base Python, torch first from the local CPU wheel."""
    py, marker = ANCHOR_VENV / "bin" / "python", ANCHOR_VENV / ".pins"
    want = " ".join((ANCHOR_TORCH, *ANCHOR_PINS))
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    log(f"building the PPO anchor venv {ANCHOR_VENV.relative_to(ROOT)} ({want}); a few minutes, once")
    shutil.rmtree(ANCHOR_VENV, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    for cmd in ([base_python, "-m", "venv", str(ANCHOR_VENV)],
                [str(py), "-m", "pip", "install", "-q", ANCHOR_TORCH],
                [str(py), "-m", "pip", "install", "-q", *ANCHOR_PINS]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"building the PPO anchor venv failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    marker.write_text(want)
    return py


def anchor_child(spec: dict) -> dict:
    """TRL 0.25.1 PPOTrainer on our prompts (ids) and model; imports nothing from this project,
    as it runs in the anchor venv."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl import PPOConfig, PPOTrainer

    torch.set_num_threads(spec["threads"])
    clock = StepClock()
    before = peak_rss_mb()
    base = spec["base"]
    special = json.loads((Path(base) / "tokenizer_config.json").read_text())
    # transformers 4.57 does not know the tokenizer class transformers 5 writes; the tokenizer.json is the same
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(base) / "tokenizer.json"), padding_side="left",
                                  eos_token=special.get("eos_token"), pad_token=special.get("pad_token") or special.get("eos_token"))
    B = spec["batch_size"]
    rollout = 2 * B
    iters = spec["warmup"] + spec["steps"]
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    ds = Dataset.from_dict({"input_ids": prompts})

    def load(cls, **kw):
        return cls.from_pretrained(base, torch_dtype=torch.float32, **kw)

    policy, ref = load(AutoModelForCausalLM), load(AutoModelForCausalLM)
    value, reward = load(AutoModelForSequenceClassification, num_labels=1), load(AutoModelForSequenceClassification, num_labels=1)
    for m in (policy, ref, value, reward):
        m.config.pad_token_id = tok.pad_token_id
    for m in (policy, ref):  # the checkpoint's own generation defaults (e.g. top_p) would change the sampling
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock({}, state.global_step)

    # In TRL 0.25 per_device_train_batch_size is the rollout per process; each of num_mini_batches
    # minibatches is one forward/backward and one optimizer step, as our micro-batch B with grad_accum 1.
    cfg = PPOConfig(output_dir=str(Path(spec["root"]) / "anchor"), per_device_train_batch_size=rollout,
                    gradient_accumulation_steps=1, num_mini_batches=rollout // B, num_ppo_epochs=PPO_EPOCHS,
                    total_episodes=rollout * iters, response_length=spec["ppo_new_tokens"], temperature=1.0,
                    local_rollout_forward_batch_size=rollout, stop_token="eos", missing_eos_penalty=1.0,
                    kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
                    learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                    adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, optim="adamw_torch_fused",
                    bf16=spec["bf16"], fp16=False,
                    gradient_checkpointing=spec["gradient_checkpointing"], num_sample_generations=0,
                    save_strategy="no", report_to=[], logging_steps=10_000, disable_tqdm=True,
                    use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds, callbacks=[Clock()])
    trainer.train()
    steps, seconds = clock.rate(spec["warmup"])
    if (cfg.batch_size, cfg.mini_batch_size) != (rollout, B):
        raise SystemExit(f"anchor rollout {cfg.batch_size} / minibatch {cfg.mini_batch_size}, expected {rollout} / {B}")
    return measured_row(spec, steps, seconds, rollout, None, before, clock.step_ms(spec["warmup"]))


# --- the parent: builds the work, runs each measurement, prints the table ---------------------

def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_info(cpuinfo: str) -> dict:
    """CPU model and whether it has native bf16 (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo's text."""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return {"cpu": model, "cores": os.cpu_count(), "native_bf16": ", ".join(native) if native else "no"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header_lines(args, info: dict, peak: float | None = None) -> list[str]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if peak:
        device += f" (MFU against {peak:g} TFLOP/s)"
    lora = (f"r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} on {','.join(LORA['target_modules'])}"
            if "lora" in args.variants else "n/a")
    return ([
        f"# machine: {info['cpu']}, {info['cores']} cores, native bf16: {info['native_bf16']}; device: {device}; "
        f"torch {torch.__version__}, {args.threads} threads; GLIBC_TUNABLES (both sides) "
        f"{os.environ.get('GLIBC_TUNABLES') or 'unset'}; every row's process reads its venv's shared libraries back "
        f"from disk, not as pip left them in the page cache (evict_library_pages); load average at start: "
        f"{load_average()}",
        f"# model: {args.model} ({args.model_path or 'tiny Llama: 4 layers, width 128, 512-token BPE'}"
        f"{', architecture and tokenizer only, seeded random weights' if args.random_init else ''})",
        f"# identical on both sides: precision {'bf16 autocast' if args.bf16 else 'fp32'} (TRL bf16={args.bf16}), "
        f"gradient checkpointing {args.gradient_checkpointing} (TRL gradient_checkpointing={args.gradient_checkpointing}), "
        f"max length {args.max_length}, batch {args.batch_size}, the same batches in the same order (TRL gets the "
        "rows our loop draws, sequential sampler), "
        + ("SFT padding-free (rows end to end, positions restarting; TRL padding_free=True)"
           if args.padding_free else "SFT right padding to the batch's longest")
        + (", RM/DPO right padding" if not args.pairs_padding_free else
           ", RM/DPO: NOT identical, ours padding-free (rm/dpo.padding_free), TRL 1.16 right-padded (RewardTrainer "
           "has no padding-free mode and DPOTrainer disables its padding_free), so these ratios show the lever "
           "against TRL's best available setting")
        + ("; RM: NOT identical, ours computes each pair's prompt once (rm.share_prompt: the rejected response "
           "continues the prompt beside the chosen one under a mask that hides it; the same rewards and gradients "
           "with fewer tokens through the model), TRL 1.16 runs the prompt with each response; tokens/s counts each "
           "pair's prompt twice on both sides"
           if args.rm_share_prompt else "")
        + f" (no packing, pad_to_multiple_of=None), LoRA {lora}, fused AdamW(0.9, 0.95) (TRL and the anchor: "
        f"optim=adamw_torch_fused) lr {LEARNING_RATE} "
        f"constant, clip 1.0, {args.warmup} warm-up + {args.steps} timed steps, one process per row"
        + (f", {args.repeats} interleaved runs of each row" if args.repeats > 1 else ""),
        f"# PPO: rollout {2 * args.batch_size} prompts, {args.ppo_new_tokens} new tokens, {PPO_EPOCHS} epochs, "
        f"minibatch {args.batch_size}, temperature 1.0"
        + ("; NOT identical: our PPO lays each forward's rows end to end after sampling (ppo.padding_free: no "
           "left padding of the prompts, nothing after a response's EOS; the same log-probs, values, rewards and "
           "gradients), the anchor's forwards are padded (TRL 0.25.1 has no such mode)" if args.ppo_padding_free else "")
        + "; DPO: a reference forward every step (no precompute) on both sides",
    ] + ([f"# TFLOP/s and MFU: the model FLOPs the timed steps need (sample_flops: matrix products of the real tokens, "
          f"LM head at scored positions only, causal attention, LoRA without frozen-weight gradients), the same "
          f"count for both sides, over the measured time; MFU against {peak:g} TFLOP/s"] if peak else [])
    + (["# ours with --no-varlen: rows end to end attend one SDPA call per row, not torch's varlen kernel"]
       if args.no_varlen else [])
    + (["# torch.compile on both sides: ours each decoder layer but the last, dynamic shapes (compile: true); TRL "
        "torch_compile=True (its Trainer compiles the whole model), dynamic shapes too (dynamo's "
        "assume_static_by_default=False); the warm-up steps pay for the compilation"]
       if args.compile else [])
    + ([f"# PROFILED (--profile {args.profile}): torch's profiler watched the timed steps, so these rates are "
        "slower than an unprofiled run's"] if args.profile else []))


def print_row(r: dict, header: bool) -> None:
    gpu = "cuda_peak_mb" in r
    if header:
        print(f"{'stage':5} {'variant':7} {'impl':6} {'steps':>5} {'samples/s':>10} {'tokens/s':>9} {'ms/step':>9} "
              f"{'step ms min-max':>15} {'peak RSS MB':>11} {'pad %':>6} {'floor ms':>8} {'floor %':>7}"
              f"{'  CUDA peak MB  TFLOP/s  MFU %' if gpu else ''}")
    tokens = "-" if r["tokens_per_s"] != r["tokens_per_s"] else f"{r['tokens_per_s']:.3g}"
    pad = "-" if r.get("padding_fraction") is None else f"{100 * r['padding_fraction']:.1f}"
    cuda = ""
    if gpu:
        tf = f"{r['model_tflops']:.1f}" if "model_tflops" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}" if "mfu" in r else "-"
        cuda = f"  {r['cuda_peak_mb']:12.0f}  {tf:>7}  {mfu:>5}"
    spread = f"{r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}" if "step_ms_min" in r else "-"
    floor = f"{r['floor_ms']:8.1f} {100 * r['floor_share']:7.1f}" if "floor_ms" in r else f"{'-':>8} {'-':>7}"
    print(f"{r['stage']:5} {r['variant']:7} {r['impl']:6} {r['steps']:5d} {r['samples_per_s']:10.3g} {tokens:>9} "
          f"{r['ms_per_step']:9.1f} {spread:>15} {r['peak_rss_mb']:11.0f} {pad:>6} {floor}{cuda}", flush=True)


TARGET = 1.3


def ratio_lines(rows: list[dict]) -> list[str]:
    """One line per (stage, variant) that has both ours and a reference: speed ratio and memory. Rows
    combined from repeats (`combine_repeats`) also give the range of the per-round ratios."""
    ours = {(r["stage"], r["variant"]): r for r in rows if r["impl"] == "ours"}
    out = []
    for r in rows:
        if r["impl"] == "ours" or (r["stage"], r["variant"]) not in ours:
            continue
        o = ours[(r["stage"], r["variant"])]
        ratio = o["samples_per_s"] / r["samples_per_s"]
        mem_key = "cuda_peak_mb" if "cuda_peak_mb" in o and "cuda_peak_mb" in r else "peak_rss_mb"
        met = ratio >= TARGET and o[mem_key] <= r[mem_key]
        unit = "prompts/s" if r["stage"] == "ppo" else "samples/s"
        spread, highest = "", ""
        if len(o.get("samples_per_s_runs", ())) > 1 and len(o["samples_per_s_runs"]) == len(r.get("samples_per_s_runs", ())):
            rounds = [a / b for a, b in zip(o["samples_per_s_runs"], r["samples_per_s_runs"])]
            spread = f", median of {len(rounds)} runs; per round {min(rounds):.2f}-{max(rounds):.2f}x"
            highest = " (highest of its runs)"
        top = ceiling(r)
        bound = "" if top is None else (
            f"; ceiling on {r['impl']}'s work on this machine {top:.2f}x"
            + (" (below the target: no loop doing that work reaches it here)" if top < TARGET else ""))
        files = ""
        if mem_key == "peak_rss_mb" and o.get("file_rss_mb") is not None and r.get("file_rss_mb") is not None:
            files = f" (file-backed pages at the end {o['file_rss_mb']:.0f} vs {r['file_rss_mb']:.0f} MB)"
        out.append(f"{r['stage']:5} {r['variant']:7} ours/{r['impl']:6} {ratio:5.2f}x {unit} "
                   f"({o['samples_per_s']:.3g} vs {r['samples_per_s']:.3g}{spread}); {mem_key} {o[mem_key]:.0f} vs "
                   f"{r[mem_key]:.0f} MB{highest}{files}; target >= {TARGET}x at <= memory: "
                   f"{'met' if met else 'NOT met'}{bound}")
    return out


def combine_repeats(rows: list[dict]) -> list[dict]:
    """One row per (stage, variant, impl) from its repeated runs (`--repeats`): the median rate,
    tokens/s, ms/step, TFLOP/s and MFU, the highest peak memory (and file-backed pages), the
    shortest and longest single step of all runs, and each run's rate in round order
    (`samples_per_s_runs`), so a ratio's spread over rounds can be read."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["variant"], r["impl"]), []).append(r)
    out = []
    for runs in groups.values():
        row = dict(runs[0])
        for k in ("samples_per_s", "tokens_per_s", "ms_per_step", "model_tflops", "mfu", "floor_ms", "floor_share"):
            if k in row:
                row[k] = statistics.median(r[k] for r in runs)
        for k in ("peak_rss_mb", "cuda_peak_mb", "step_ms_max", "file_rss_mb"):
            if row.get(k) is not None:
                row[k] = max(r[k] for r in runs if r.get(k) is not None)
        if "step_ms_min" in row:
            row["step_ms_min"] = min(r["step_ms_min"] for r in runs)
        row["runs"], row["samples_per_s_runs"] = len(runs), [r["samples_per_s"] for r in runs]
        out.append(row)
    return out


DIFFERENCES = {
    "sft": "sft: same ids and labels (TRL gets our tokenised split); TRL also computes per-step entropy and "
           "token-accuracy metrics, which is part of its trainer's work; ours runs the last layer (and the LM head) "
           "only at the scored positions, TRL at every position",
    "rm": "rm: same ids (TRL gets our tokenised pairs); same score head read at the last non-pad token; ours runs "
          "the last layer only there (last_layer_at), TRL at every position",
    "dpo": "dpo: TRL renders the same chats with the same template itself (its DPOTrainer takes no pre-tokenised "
           "pairs): compare the rows' tokens/sample in --json; ours runs the last layer (and the LM head) only at "
           "the response positions, TRL at every position",
    "ppo": "ppo anchor (TRL 0.25.1, transformers 4.57.6): policy, frozen reference copy, value model and reward "
           "model are four separate models as ours (full fine-tune); its one optimizer steps policy+value with "
           "vf_coef 0.1 where ours has two parameter groups; it truncates responses after EOS; it reads no "
           "rope_parameters from a transformers-5 config (same FLOPs); both take the same prompt ids; both take the "
           "old log-probs from the sampling logits (ours ppo.sampling_logprobs), not from a second policy forward; "
           "both pad the rollout to its longest prompt for sampling and scoring, ours pads each update micro-batch "
           "to its own longest row (ppo.micro_rollout: the columns that are padding in all its rows are cut), the "
           "anchor to the rollout's; ours forwards the critic once for the first micro-batch's values (at the "
           "experience, with their graph: the critic has not stepped yet), the anchor twice; ours runs the last "
           "layer of each model only where its output is read (the response positions, the reward's last token)",
}


def jobs_for(args) -> list[tuple[str, str, str]]:
    jobs = []
    for stage in args.stages:
        variants = ["full"] if stage in ("pt", "ppo") else args.variants
        for variant in variants:
            jobs.append((stage, variant, "ours"))
            if args.trl and stage in TRL_STAGES:
                jobs.append((stage, variant, "trl"))
            if args.ppo_anchor and stage == "ppo":
                jobs.append((stage, variant, "anchor"))
    return jobs


def evict_library_pages(venv: Path) -> int:
    """Drop the page cache's copies of the shared libraries in `venv`'s site-packages (written to disk
    first, then posix_fadvise DONTNEED; pages a running process maps stay, so `main` calls it
    once for our venv, before it imports torch, and `run_job` for the anchor's before each of its
    rows), so the processes of the rows read their libraries back from disk, whichever side they
    are and however their venv was installed. How many of a library's pages
    a process comes to hold depends on how they came into the cache: on the 2026-12-07 machine
    (ext4, Linux 6.18) libtorch_cpu.so held 114 MB in a row of a fresh clone, whose pip had just
    written the file, and 67-68 MB once its pages had been read back from disk, as in the
    anchor's venv built in the same run. Returns how many files it asked about (0 where the OS
    has no fadvise)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for path in (p for site in venv.glob("lib/python*/site-packages") for p in site.rglob("*.so*")):
        if not path.is_file():  # a folder named *.so*, a dangling link
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)  # pages pip has just written and the disk not yet: the cache drops only clean ones
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def run_job(spec: dict, python: Path) -> dict | None:
    flag = "--anchor-child" if spec["impl"] == "anchor" else "--child"
    if spec["impl"] == "anchor":  # a venv this process never maps, perhaps built by pip moments ago (`main`: ours)
        evict_library_pages(ANCHOR_VENV)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    if spec["impl"] == "anchor":
        env.pop("PYTHONPATH")  # the anchor venv must not see this project's packages
    proc = subprocess.run([str(python), __file__, flag, json.dumps(spec)], capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not line:
        print(f"{spec['stage']}/{spec['variant']}/{spec['impl']}: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return json.loads(line[0][6:])


def resolve_model_path(args) -> Path | None:
    if args.model == "tiny":
        return None
    path = args.model_path or (SMOLLM2_DIR if SMOLLM2_DIR.exists() else SMOLLM2_CACHE)
    if not (Path(path) / "config.json").exists():
        raise SystemExit(f"{path}: no SmolLM2 model folder (config.json missing); build it with `make smollm2` "
                         "(rlhf smollm2) or pass --model-path")
    return Path(path)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--model-path", type=Path, help=f"SmolLM2 HF folder (default {SMOLLM2_DIR.relative_to(ROOT)})")
    ap.add_argument("--stages", nargs="+", choices=STAGES)
    ap.add_argument("--variants", nargs="+", choices=("full", "lora"))
    ap.add_argument("--trl", action="store_true", help="also time TRL 1.16's trainers (sft, rm, dpo) on the same work")
    ap.add_argument("--ppo-anchor", action="store_true", help="also time TRL 0.25.1's PPOTrainer (own venv)")
    ap.add_argument("--steps", type=int, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--records", type=int)
    ap.add_argument("--ppo-new-tokens", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default fp32 on both)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (default off on both)")
    ap.add_argument("--padding-free", action="store_true",
                    help="SFT rows end to end without padding on both sides (ours sft.padding_free, TRL padding_free=True)")
    ap.add_argument("--pairs-padding-free", action="store_true",
                    help="RM and DPO pairs end to end on our side only (rm/dpo.padding_free); TRL 1.16 has no such "
                         "mode, so those rows are not identical work (the header says so)")
    ap.add_argument("--rm-share-prompt", action="store_true",
                    help="our RM computes each pair's prompt once (rm.share_prompt; one padded row per pair, or all "
                         "pairs in one row with --pairs-padding-free); TRL has no such mode (the header says so)")
    ap.add_argument("--ppo-padding-free", action="store_true",
                    help="our PPO's forwards after sampling end to end without padding (ppo.padding_free); the "
                         "anchor has no such mode, so the PPO row is not identical work (the header says so)")
    ap.add_argument("--no-varlen", action="store_true",
                    help="ours: rows end to end attend one SDPA call per row even where the GPU has torch's varlen "
                         "flash-attention kernel (modeling.varlen_kernel), to measure that lever")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile on both sides: ours each decoder layer but the last, for dynamic shapes "
                         "(compile: true), TRL torch_compile=True (the whole model, its Trainer's switch), also for "
                         "dynamic shapes; the first steps compile, so keep --warmup at 3 or more; not for PPO")
    ap.add_argument("--random-init", action="store_true",
                    help="smollm2: the model's architecture from --model-path's config.json and tokenizer, with seeded "
                         "random weights (a host without the weights; the steps cost the same)")
    ap.add_argument("--peak-tflops", type=float,
                    help="the device's peak for MFU (default: the datasheet's dense bf16 peak of a known GPU with --bf16)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="write torch.profiler's per-op table of each row's timed steps to DIR/STAGE-VARIANT-IMPL.txt "
                         "(CPU and CUDA time, memory); the profiler slows the rows it watches, so their rates are not "
                         "comparable with unprofiled runs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every row this many times, in interleaved rounds (ours, the reference, ours, ...), "
                         "and report each row's median rate and highest peak memory, with the ratio's range over "
                         "rounds (on a shared machine one run of a row moves by 5-10%%)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    for k, v in PRESETS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.compile and "ppo" in args.stages:
        ap.error("--compile is not for PPO (ppo.compile is refused: its rollouts generate token by token)")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--rates-child":
        spec = json.loads(argv[1])
        rates = machine_rates(spec["threads"], spec["bf16"], spec["counts"], [tuple(x) for x in spec["shapes"]])
        print("BENCH " + json.dumps(rates), flush=True)
        return
    if argv and argv[0] in ("--child", "--anchor-child"):
        spec = json.loads(argv[1])
        if argv[0] == "--child":
            sys.path.insert(0, str(ROOT))
            from flows.settings import apply_defaults

            apply_defaults()
        row = child(spec) if argv[0] == "--child" else anchor_child(spec)
        print("BENCH " + json.dumps(row), flush=True)
        return
    args = parse_args(argv)
    # before this process maps any of them (the rows' processes share its copies of the libraries,
    # which then stay in the cache as they came): our venv's libraries, read back from disk from here on
    evict_library_pages(Path(sys.prefix))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder
    sys.path.insert(0, str(ROOT))
    from flows.settings import apply_defaults, apply_stage_env

    apply_defaults()
    apply_stage_env()  # every row, ours and the references', runs as a pipeline stage would
    args.model_path = resolve_model_path(args)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    info = cpu_info(read_cpuinfo())
    peak = peak_tflops_for(args)
    for line in header_lines(args, info, peak):
        print(line, flush=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        root = Path(tmp)
        base = build_workdir(root, args.model, args.model_path, args.records, args.max_length,
                             random_init=args.random_init)
        prompts_file = root / "prompts.json"
        arch = arch_of(base)
        rates = measure_rates(args, arch)
        if rates:
            print(floor_line(rates), flush=True)
        for stage, variant, impl in [job for _ in range(args.repeats) for job in jobs_for(args)]:
            n_batches = args.warmup + args.steps  # every micro-batch our loop and TRL's trainer train on
            stats = padding_stats(stage, root, 2 * args.batch_size if stage == "ppo" else args.batch_size, n_batches,
                                  layout=our_layout(stage, impl, args))
            spec = {"model": args.model, "stage": stage, "variant": variant, "impl": impl, "root": tmp,
                    "base": str(base), "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                    "max_length": args.max_length, "threads": args.threads, "bf16": args.bf16,
                    "gradient_checkpointing": args.gradient_checkpointing, "padding_free": args.padding_free,
                    "pairs_padding_free": args.pairs_padding_free, "rm_share_prompt": args.rm_share_prompt,
                    "ppo_padding_free": args.ppo_padding_free, "no_varlen": args.no_varlen, "compile": args.compile,
                    "ppo_new_tokens": args.ppo_new_tokens,
                    "tokens_per_sample": None if stage == "ppo" else stats["tokens_per_sample"],
                    "padding_fraction": stats["padding_fraction"], "prompts_file": str(prompts_file),
                    "profile_dir": str(args.profile.resolve()) if args.profile else None}
            if impl == "trl":
                spec["rows"] = stats["rows"]
            python = Path(sys.executable)
            if impl == "anchor":
                python = anchor_python()
                from datasets import load_from_disk

                prompts_file.write_text(json.dumps(load_from_disk(str(root / "tok" / "prompts" / "train"))[:]["prompt_ids"]))
            row = run_job(spec, python)
            if row:
                timed = (stage, variant, root, base, stats["rows"], args.batch_size, args.warmup, args.steps)
                real = timed_step_flops(*timed)  # the task's FLOPs (MFU); the floor counts the row's own layout
                layout = our_layout(stage, impl, args)
                add_mfu(row, real, peak)
                add_floor(row, real if layout == "end_to_end" else timed_step_flops(*timed, layout),
                          trainable_values(stage, variant == "lora", arch), rates)
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    print(f"# load average at end: {load_average()}; started {started}")
    measured = rows
    if args.repeats > 1:  # rounds interleave ours and the references, so both see the machine's drift
        rows = combine_repeats(rows)
        print(f"# median of {args.repeats} runs per row (peak memory: the highest):")
        for i, r in enumerate(rows):
            print_row(r, header=i == 0)
    lines = ratio_lines(rows)
    if lines:
        print("# ratios (ours / reference, samples/s; same run):")
        for line in lines:
            print("  " + line)
        print("# where the work differs:")
        for stage in dict.fromkeys(r["stage"] for r in rows if r["impl"] != "ours"):
            print("  - " + DIFFERENCES[stage])
    if args.json:
        meta = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "started": started,
                "load_average_end": load_average(), "machine_rates": rates}
        runs = {"runs": measured} if args.repeats > 1 else {}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, **runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
