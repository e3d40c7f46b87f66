"""The benchmark harness: TRL's configs are set to our work (not to TRL's bf16 / checkpointing
defaults), the data statistics are right, and one real run times our loop and TRL's trainer on the
same token ids. Speeds are printed, never asserted."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def spec_for(stage: str, tmp_path, bf16=False, checkpointing=False, variant="full", padding_free=False) -> dict:
    return {"stage": stage, "root": str(tmp_path), "batch_size": 3, "warmup": 1, "steps": 2, "max_length": 96,
            "bf16": bf16, "gradient_checkpointing": checkpointing, "variant": variant, "padding_free": padding_free}


@pytest.mark.parametrize("stage,config", [("sft", "SFTConfig"), ("rm", "RewardConfig"), ("dpo", "DPOConfig")])
def test_trl_configs_carry_our_precision_checkpointing_length_and_padding_not_their_defaults(stage, config, tmp_path):
    import trl

    cls = getattr(trl, config)
    default = cls(output_dir=str(tmp_path / "default"), use_cpu=True)
    assert default.gradient_checkpointing is True  # TRL 1.16's default, which the harness must override
    ours = cls(**bench.trl_config_kwargs(spec_for(stage, tmp_path)))
    assert (ours.bf16, ours.gradient_checkpointing, ours.max_length, ours.per_device_train_batch_size) == (False, False, 96, 3)
    assert getattr(ours, "activation_checkpointing", False) is False  # transformers 5's name for the same switch
    assert ours.max_steps == 3 and ours.learning_rate == bench.LEARNING_RATE and ours.pad_to_multiple_of is None
    assert (ours.adam_beta1, ours.adam_beta2, ours.max_grad_norm, ours.gradient_accumulation_steps) == (0.9, 0.95, 1.0, 1)
    assert default.train_sampling_strategy == "random" and ours.train_sampling_strategy == "sequential"  # our order
    if stage in ("sft", "dpo"):
        assert ours.padding_free is False
    on = cls(**bench.trl_config_kwargs(spec_for(stage, tmp_path, checkpointing=True)))
    assert on.gradient_checkpointing is True and on.gradient_checkpointing_kwargs == {"use_reentrant": False}
    if stage == "sft":  # --padding-free: TRL's padding-free collator, on our already truncated rows
        free = cls(**bench.trl_config_kwargs(spec_for(stage, tmp_path, padding_free=True)))
        assert (free.padding_free, free.packing, free.max_length) == (True, False, None)


def test_trl_lora_config_is_ours():
    cfg = bench.trl_peft_config({"variant": "lora"}, "SEQ_CLS")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (bench.LORA["r"], bench.LORA["alpha"], bench.LORA["dropout"])
    assert set(cfg.target_modules) == set(bench.LORA["target_modules"]) and cfg.task_type == "SEQ_CLS"
    assert bench.trl_peft_config({"variant": "full"}, "CAUSAL_LM") is None


def test_cpu_info_names_the_model_and_native_bf16():
    text = "processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx512f amx_bf16 avx512_bf16\n"
    assert bench.cpu_info(text) == {"cpu": "Some CPU 9000", "cores": bench.os.cpu_count(),
                                    "native_bf16": "amx_bf16, avx512_bf16"}
    assert bench.cpu_info("model name\t: Old CPU\nflags\t\t: fpu sse avx2\n")["native_bf16"] == "no"


def test_padding_stats_by_hand(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[1] * 2, [1] * 4, [1] * 6, [1] * 8],
                       "labels": [[1] * 2, [1] * 4, [1] * 6, [1] * 8]}).save_to_disk(str(tmp_path / "tok" / "sft" / "train"))
    # one batch of all four rows: 20 real tokens in 4 x 8 slots
    stats = bench.padding_stats("sft", tmp_path, batch_size=4, n_batches=1)
    assert sorted(stats.pop("rows")) == [0, 1, 2, 3]
    assert stats == {"tokens_per_sample": 5.0, "padding_fraction": 1 - 20 / 32}
    Dataset.from_dict({"prompt_ids": [[1], [1, 1]], "chosen_ids": [[2], [2, 2, 2]],
                       "rejected_ids": [[3, 3], [3]]}).save_to_disk(str(tmp_path / "tok" / "preference" / "train"))
    # sequences (prompt + response): 2, 3 | 5, 3 -> 13 real tokens in 4 x 5 slots; a pair counts both
    stats = bench.padding_stats("dpo", tmp_path, batch_size=2, n_batches=1)
    assert sorted(stats.pop("rows")) == [0, 1]
    assert stats == {"tokens_per_sample": 6.5, "padding_fraction": 1 - 13 / 20}
    # rm.share_prompt, one row per pair: prompt + chosen + rejected = 4 | 6 real tokens in 2 x 6 slots;
    # all pairs in one row: no padding
    shared = bench.padding_stats("rm", tmp_path, batch_size=2, n_batches=1, layout="shared_prompt")
    assert shared["tokens_per_sample"] == 6.5 and shared["padding_fraction"] == 1 - 10 / 12
    one_row = bench.padding_stats("rm", tmp_path, batch_size=2, n_batches=1, layout="shared_prompt_one_row")
    assert one_row["padding_fraction"] == 0.0
    assert bench.padding_stats("dpo", tmp_path, batch_size=2, n_batches=1, layout="end_to_end")["padding_fraction"] == 0.0


def test_ratio_lines_compare_the_same_stage_and_variant():
    def row(stage, variant, impl, sps, rss):
        return {"stage": stage, "variant": variant, "impl": impl, "samples_per_s": sps, "peak_rss_mb": rss}

    rows = [row("sft", "full", "ours", 30.0, 500), row("sft", "full", "trl", 20.0, 600),
            row("sft", "lora", "ours", 13.0, 700), row("sft", "lora", "trl", 10.0, 600),
            row("ppo", "full", "ours", 2.0, 500), row("ppo", "full", "anchor", 2.5, 400)]
    lines = bench.ratio_lines(rows)
    assert len(lines) == 3
    assert "1.50x" in lines[0] and lines[0].endswith(": met")
    assert "1.30x" in lines[1] and lines[1].endswith("NOT met")  # fast enough, but more memory
    assert "0.80x prompts/s" in lines[2] and lines[2].endswith("NOT met")


def test_smollm2_records_are_public_formats_of_varied_length(tmp_path):
    from rlhf_core.data import formats

    sft, pref = bench.raw_records("smollm2", 60, seed=1)
    bench.write_jsonl(tmp_path / "sft.jsonl", sft)
    bench.write_jsonl(tmp_path / "pref.jsonl", pref)
    convs, pairs = formats.read_conversations(tmp_path / "sft.jsonl"), formats.read_preferences(tmp_path / "pref.jsonl")
    assert len(convs) == len(pairs) == 60 and set(sft[0]) == {"conversations"}
    words = [len(p.chosen.split()) for p in pairs]
    assert min(words) < 20 < max(words) <= 90
    assert max(len(r["prompt"].split()) for r in pref) <= 60


def test_jobs_put_each_reference_beside_our_row():
    args = bench.parse_args(["--model", "smollm2", "--trl", "--ppo-anchor"])
    jobs = bench.jobs_for(args)
    assert jobs[:4] == [("sft", "full", "ours"), ("sft", "full", "trl"), ("sft", "lora", "ours"), ("sft", "lora", "trl")]
    assert jobs[-2:] == [("ppo", "full", "ours"), ("ppo", "full", "anchor")]
    assert len(jobs) == 14 and (args.batch_size, args.max_length) == (2, 256)
    assert all(impl == "ours" for _, _, impl in bench.jobs_for(bench.parse_args(["--stages", "pt", "sft"])))


def run_bench(tmp_path, *extra) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--steps", "2", "--warmup", "1",
                           "--records", "24", "--threads", "1", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())["rows"]


@pytest.mark.slow  # four training processes
def test_bench_times_our_loop_and_trls_trainer_on_the_same_token_ids(tmp_path):
    proc, rows = run_bench(tmp_path, "--stages", "sft", "dpo", "--trl")
    assert [(r["stage"], r["impl"]) for r in rows] == [("sft", "ours"), ("sft", "trl"), ("dpo", "ours"), ("dpo", "trl")]
    for r in rows:
        assert r["steps"] == 2 and r["samples_per_step"] == 8
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0
    for stage in ("sft", "dpo"):  # identical work: both sides put the same tokens through the model
        ours, trl = (r["tokens_per_sample"] for r in rows if r["stage"] == stage)
        assert ours == pytest.approx(trl)
    out = proc.stdout
    assert "native bf16:" in out and "TRL bf16=False" in out and "TRL gradient_checkpointing=False" in out
    assert "samples/s" in next(line for line in out.splitlines() if line.startswith("stage"))
    assert sum("ours/trl" in line for line in out.splitlines()) == 2


@pytest.mark.slow
@pytest.mark.skipif(not (bench.ANCHOR_VENV / ".pins").exists(), reason="the PPO anchor venv is not built "
                    "(python benchmarks/bench.py --stages ppo --ppo-anchor builds it)")
def test_ppo_anchor_runs_the_same_rollout_as_ours(tmp_path):
    proc, rows = run_bench(tmp_path, "--stages", "ppo", "--ppo-anchor")
    assert [r["impl"] for r in rows] == ["ours", "anchor"]
    assert all(r["samples_per_step"] == 16 and r["steps"] == 2 for r in rows)
    assert "ours/anchor" in proc.stdout


def test_trl_gets_the_batches_our_loop_draws_in_its_order(tmp_path):
    """Both sides train the same micro-batches: TRL's rows are our loop's draw (index_batches, seed 0)
    and its sampler is sequential, so batch k of TRL's dataloader is our batch k."""
    from datasets import Dataset

    from rlhf_core.data.batching import index_batches

    prompts = [[i] for i in range(10)]
    Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": [[100 + i] for i in range(10)],
                       "rejected_ids": [[200 + i] * (1 + i % 3) for i in range(10)]}).save_to_disk(
        str(tmp_path / "tok" / "preference" / "train"))
    rows = bench.drawn_rows(10, 4, n_batches=5)  # past one epoch (2 batches of 4, the tail dropped)
    draw = index_batches(10, 4, 0)
    assert rows == [i for _ in range(5) for i in next(draw)]
    assert rows[:8] != sorted(rows[:8]), "a seeded permutation, not the file order"
    trl_rows = bench.trl_rm_rows(tmp_path, rows)
    assert trl_rows["chosen_ids"] == [[i, 100 + i] for i in rows]
    assert trl_rows["rejected_ids"] == [[i] + [200 + i] * (1 + i % 3) for i in rows]
    # the padding statistics describe exactly these batches
    stats = bench.padding_stats("rm", tmp_path, batch_size=4, n_batches=5)
    assert stats.pop("rows") == rows  # what main hands TRL
    lengths = [[2, 1 + 1 + i % 3] for i in range(10)]
    real = sum(sum(lengths[i]) for i in rows)
    slots = sum(8 * max(n for i in rows[j:j + 4] for n in lengths[i]) for j in range(0, 20, 4))
    assert stats == {"tokens_per_sample": real / 20, "padding_fraction": 1 - real / slots}
