"""The benchmark harness: TRL's configs are set to our work (not to TRL's bf16 / checkpointing
defaults), the data statistics are right, and one real run times our loop and TRL's trainer on the
same token ids. Speeds are printed, never asserted."""
import importlib.util
import json
import os
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
    assert ours.torch_compile is False and default.torch_compile is False
    compiled = cls(**bench.trl_config_kwargs({**spec_for(stage, tmp_path), "compile": True}))  # --compile
    assert compiled.torch_compile is True


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
    assert "file-backed" not in "".join(lines)  # rows without the figure
    rows[0]["file_rss_mb"], rows[1]["file_rss_mb"] = 150.0, 210.0
    assert "600 MB (file-backed pages at the end 150 vs 210 MB); target" in bench.ratio_lines(rows)[0]


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


def tiny_llama(tmp_path, lora: bool):
    """A 3-layer Llama with grouped-query attention and tied embeddings, eager attention (its
    matrix products are plain matmuls a FLOP counter sees), its config.json in `tmp_path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=300, tie_word_embeddings=True, attn_implementation="eager")
    cfg.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=bench.LORA["r"], lora_alpha=bench.LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=list(bench.LORA["target_modules"]), task_type="CAUSAL_LM"))
    return model


def test_sample_flops_by_hand(tmp_path):
    tiny_llama(tmp_path, lora=False)
    a = bench.arch_of(tmp_path)
    assert a == {"d": 64, "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 96, "vocab": 300, "tied": True}
    # trunk weights per layer: q 64x64, k and v 64x32 each, o 64x64, MLP 3 x 64x96 = 30720; x3 layers = 92160;
    # the last layer's q, o and MLP (26624) run only at the R positions read: SFT/DPO the S scored, RM 1
    # SFT, 5 tokens, 2 scored: linear 2*(92160-26624)*5 + 2*26624*2 = 761856;
    # attention 2*4*16*(2*5*6 + 2*(2*5-2+1)) = 9984; head 2*64*300*2 = 76800
    fwd = 761856 + 9984 + 76800
    assert bench.sample_flops("sft", False, a, [(5, 2)]) == 3 * fwd
    assert bench.sample_flops("dpo", False, a, [(5, 2), (5, 2)]) == 2 * 4 * fwd  # + the reference's forward
    # RM, R = 1: linear 655360 + 2*26624 = 708608; attention 2*4*16*(60 + 1*10) = 8960; head 2*64
    assert bench.sample_flops("rm", False, a, [(5, 0)]) == 3 * (708608 + 8960 + 2 * 64)
    # every position read: the whole trunk, causal attention in every layer
    assert bench.sample_flops("sft", False, a, [(5, 5)]) == 3 * (2 * 92160 * 5 + 2 * 4 * 16 * 3 * 5 * 6 + 2 * 64 * 300 * 5)
    # LoRA r=8 on q, k, v, o: (in + out) = 128 + 128 + 96 + 96 = 448 per layer, the last layer's q and o
    # (256) at the 2 read positions only; layer 0's q, k and v input gradients (128 x 64 base, 3 x 8 x 64
    # adapter) are not computed
    adapters = 6 * 8 * ((3 * 448 - 256) * 5 + 256 * 2)
    lora = 2 * (761856 + 76800) + 3 * 9984 + adapters - 2 * (64 * 128 + 3 * 8 * 64) * 5
    assert bench.sample_flops("sft", True, a, [(5, 2)]) == lora


def test_sample_flops_equal_what_torch_counts_when_our_last_layer_runs_at_the_scored_positions(tmp_path):
    """Our forward with `keep` (the last layer only where its output is read, `last_layer_at`):
    torch's FLOP counter sees sample_flops' products, with eager attention's whole T x T square in
    the other layers where the count takes the causal pairs, and nothing for the last layer's
    attention (SDPA's CPU kernel, for which the counter has no formula)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from rlhf_core.training.modeling import forward_logits

    model = tiny_llama(tmp_path, lora=False)
    a, T, S = bench.arch_of(tmp_path), 9, 3
    ids = torch.randint(0, a["vocab"], (1, T))
    keep = torch.zeros(1, T, dtype=torch.bool)
    keep[0, T - 1 - S:T - 1] = True  # the positions that predict the last S tokens
    with FlopCounterMode(display=False) as counter:
        logits = forward_logits(model, ids, torch.ones(1, T, dtype=torch.long), keep)
        torch.nn.functional.cross_entropy(logits, ids[0, T - S:]).backward()
    per_pair = 2 * a["heads"] * a["head_dim"]
    causal = per_pair * ((a["layers"] - 1) * T * (T + 1) + S * (2 * T - S + 1))
    counted = per_pair * (a["layers"] - 1) * 2 * T * T
    assert counter.get_total_flops() == bench.sample_flops("sft", False, a, [(T, S)]) - 3 * causal + 3 * counted
    assert counter.get_total_flops() < bench.sample_flops("sft", False, a, [(T, T)])  # the whole last layer costs more


@pytest.mark.parametrize("lora", [False, True])
def test_sample_flops_equal_the_matmuls_torch_counts_in_a_training_step(tmp_path, lora):
    """torch's FLOP counter over one forward and backward of a real Llama (full fine-tune, or LoRA
    whose frozen weights get no gradient) counts what sample_flops says, except that eager attention
    computes the whole T x T square where the count takes the causal half (T(T+1)/2 pairs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama(tmp_path, lora)
    a, T = bench.arch_of(tmp_path), 7
    ids = torch.randint(0, a["vocab"], (1, T))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    attention_fwd = lambda square: 2 * a["layers"] * a["heads"] * a["head_dim"] * square  # noqa: E731
    expected = bench.sample_flops("sft", lora, a, [(T, T)]) - 3 * attention_fwd(T * (T + 1)) + 3 * attention_fwd(2 * T * T)
    assert counter.get_total_flops() == expected


def test_mfu_is_the_counted_flops_over_the_measured_time_and_the_devices_peak(monkeypatch):
    import torch

    row = bench.add_mfu({"ms_per_step": 250.0}, flops_per_step=5e12, peak_tflops=100.0)
    assert row == {"ms_per_step": 250.0, "model_tflops": 20.0, "mfu": 0.2}
    assert bench.add_mfu({"ms_per_step": 250.0}, None, 100.0) == {"ms_per_step": 250.0}  # PPO: not counted
    args = bench.parse_args(["--model", "smollm2", "--bf16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    assert bench.peak_tflops_for(args) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some New GPU")
    assert bench.peak_tflops_for(args) is None  # unknown: MFU only with --peak-tflops
    assert bench.peak_tflops_for(bench.parse_args(["--bf16", "--peak-tflops", "500"])) == 500.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    assert bench.peak_tflops_for(bench.parse_args(["--model", "smollm2"])) is None  # fp32: no bf16 peak applies


def test_timed_step_flops_count_the_timed_batches_only(tmp_path):
    from datasets import Dataset

    tiny_llama(tmp_path / "base", lora=False)
    Dataset.from_dict({"input_ids": [[1] * 4, [1] * 6, [1] * 8, [1] * 10],
                       "labels": [[-100, 1, 1, 1], [-100] * 6, [1] * 8, [-100] * 5 + [1] * 5]}
                      ).save_to_disk(str(tmp_path / "tok" / "sft" / "train"))
    a = bench.arch_of(tmp_path / "base")
    rows = [3, 0, 2, 1]  # batch 2: batch 0 = rows 3, 0 (warm-up), batch 1 = rows 2, 1 (timed)
    got = bench.timed_step_flops("sft", "full", tmp_path, tmp_path / "base", rows, batch_size=2, warmup=1, steps=1)
    # row 2: 8 tokens, 7 scored (labels[1:] trained); row 1: 6 tokens, none scored
    assert got == bench.sample_flops("sft", False, a, [(8, 7)]) + bench.sample_flops("sft", False, a, [(6, 0)])
    assert bench.timed_step_flops("ppo", "full", tmp_path, tmp_path / "base", rows, 2, 1, 1) is None
    # right-padded, every sequence of the batch goes through the trunk at the longest (8 tokens); the head
    # still projects only the scored positions
    padded = bench.timed_step_flops("sft", "full", tmp_path, tmp_path / "base", rows, 2, 1, 1, layout="padded")
    assert padded == bench.sample_flops("sft", False, a, [(8, 7)]) + bench.sample_flops("sft", False, a, [(8, 0)])
    assert padded > got
    assert bench.timed_step_flops("sft", "full", tmp_path, tmp_path / "base", rows, 2, 1, 1,
                                  layout="shared_prompt") is None  # not counted


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("lora", [False, True])
def test_trainable_values_are_what_the_optimizer_steps(tmp_path, stage, lora):
    """The count the optimizer's floor is measured at equals the trainable parameters of the real
    model: a causal LM with tied embeddings, or a reward model (sequence classifier), full or with
    LoRA on q, k, v, o (peft also trains the reward model's score head)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = tiny_llama(tmp_path, lora=False)
    if stage == "rm":
        model = LlamaForSequenceClassification(LlamaConfig.from_pretrained(tmp_path, num_labels=1))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=bench.LORA["r"], lora_alpha=bench.LORA["alpha"],
                                                 target_modules=list(bench.LORA["target_modules"]),
                                                 task_type="SEQ_CLS" if stage == "rm" else "CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert bench.trainable_values(stage, lora, bench.arch_of(tmp_path)) == trainable


def test_floor_and_ceiling_by_hand():
    rates = {"matmul_flops_per_s": 1e11, "optimizer_ms": {"100": 5.0}, "dtype": "float32"}
    # 2e10 FLOPs at 1e11 FLOP/s = 200 ms, + 5 ms of optimizer step = 205 ms, of a 410 ms step
    row = bench.add_floor({"ms_per_step": 410.0}, 2e10, 100, rates)
    assert row == {"ms_per_step": 410.0, "floor_ms": 205.0, "floor_share": 0.5}
    assert bench.ceiling(row) == 2.0
    assert bench.ceiling({"ms_per_step": 410.0}) is None
    assert bench.add_floor({"ms_per_step": 1.0}, None, 100, rates) == {"ms_per_step": 1.0}  # PPO: not counted
    assert bench.add_floor({"ms_per_step": 1.0}, 1e9, 100, None) == {"ms_per_step": 1.0}  # no rates measured

    def row_of(impl, sps, ms, floor):
        return {"stage": "rm", "variant": "full", "impl": impl, "samples_per_s": sps, "peak_rss_mb": 100,
                "ms_per_step": ms, "floor_ms": floor}

    near = bench.ratio_lines([row_of("ours", 1.0, 1000, 900), row_of("trl", 1.0, 1000, 900)])[0]
    assert "ceiling on trl's work on this machine 1.11x (below the target" in near
    roomy = bench.ratio_lines([row_of("ours", 1.0, 1000, 900), row_of("trl", 1.0, 1000, 500)])[0]
    assert roomy.endswith("ceiling on trl's work on this machine 2.00x")
    no_floor = row_of("trl", 1.0, 1, 1)
    del no_floor["floor_ms"]
    assert "ceiling" not in bench.ratio_lines([row_of("ours", 1.0, 1, 1), no_floor])[0]


def test_machine_rates_measure_a_product_rate_and_each_optimizer_step():
    rates = bench.machine_rates(1, False, [1000, 5000], [(64, 32, 16)])
    assert rates["dtype"] == "float32" and set(rates["optimizer_ms"]) == {"1000", "5000"}
    assert 1e6 < rates["matmul_flops_per_s"] < 1e14 and all(0 < ms < 1000 for ms in rates["optimizer_ms"].values())


def test_random_init_keeps_the_architecture_and_tokenizer_with_seeded_weights(tmp_path):
    import torch

    tiny_llama(tmp_path, lora=False)
    a, b = bench.random_causal_lm(tmp_path, seed=3), bench.random_causal_lm(tmp_path, seed=3)
    c = bench.random_causal_lm(tmp_path, seed=4)
    assert a.config.num_hidden_layers == 3 and a.config.num_key_value_heads == 2 and a.dtype == torch.float32
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_the_profiler_watches_exactly_the_timed_steps(tmp_path):
    import torch

    clock = bench.StepClock((tmp_path / "p.txt", 1, 3))
    x = torch.ones(8, 8)
    for step in range(1, 5):
        if step in (2, 3):  # the timed steps: only these matmuls are inside the profile
            x = x @ x / 8
        else:
            x = torch.cat([x, x])[:8]
        clock({}, step)
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("# 2 steps") and "aten::mm" in text and "aten::cat" not in text
    assert clock.profiler is None and sorted(clock.times) == [1, 2, 3, 4]


def test_each_timed_steps_own_duration_by_hand():
    """Steps 0-1 are warm-up; 2 -> 3 took 0.5 s, 3 -> 5 (step 4 not logged) 3 s, so 1.5 s each."""
    clock = bench.StepClock()
    clock.times = {0: 0.0, 1: 9.0, 2: 10.0, 3: 10.5, 5: 13.5}
    assert clock.step_ms(warmup=2) == [500.0, 1500.0]
    assert clock.rate(warmup=2) == (3, 3.5)
    row = bench.measured_row({"model": "tiny", "stage": "sft", "variant": "full", "impl": "ours"}, 3, 3.5, 8, 10.0,
                             100.0, clock.step_ms(warmup=2))
    assert (row["step_ms_min"], row["step_ms_max"]) == (500.0, 1500.0) and round(row["ms_per_step"], 3) == 1166.667


def test_repeated_runs_combine_to_medians_the_highest_memory_and_the_ratio_range():
    """Three interleaved rounds of SFT, ours and TRL (rates by hand): each row becomes its median
    rate and highest peak RSS, and the ratio line gives the per-round ratios' range."""
    def run(impl, sps, rss, ms):
        return {"stage": "sft", "variant": "full", "impl": impl, "samples_per_s": sps, "tokens_per_s": 10 * sps,
                "ms_per_step": ms, "peak_rss_mb": rss, "step_ms_min": ms - 50 * sps, "step_ms_max": ms + 100 * sps}

    rounds = [(run("ours", 3.0, 900, 667), run("trl", 2.0, 1000, 1000)),
              (run("ours", 2.6, 950, 769), run("trl", 2.0, 990, 1000)),
              (run("ours", 2.7, 920, 741), run("trl", 2.5, 980, 800))]
    combined = bench.combine_repeats([r for pair in rounds for r in pair])
    ours, trl = combined
    assert (ours["impl"], trl["impl"]) == ("ours", "trl")
    assert ours["samples_per_s"] == 2.7 and ours["tokens_per_s"] == 27.0 and ours["ms_per_step"] == 741
    assert trl["samples_per_s"] == 2.0 and trl["ms_per_step"] == 1000
    assert ours["peak_rss_mb"] == 950 and trl["peak_rss_mb"] == 1000
    assert (ours["step_ms_min"], ours["step_ms_max"]) == (517, 1029)  # the shortest and longest step of any run
    assert (trl["step_ms_min"], trl["step_ms_max"]) == (675, 1200)
    assert ours["samples_per_s_runs"] == [3.0, 2.6, 2.7] and ours["runs"] == 3
    (line,) = bench.ratio_lines(combined)
    assert "1.35x" in line and "median of 3 runs; per round 1.08-1.50x" in line and line.endswith(": met")


def test_peak_rss_is_the_rows_own_not_the_harness_it_was_started_from():
    """A row's process reports its own high-water mark (VmHWM): getrusage's ru_maxrss carries
    the parent's RSS across fork and exec, so a small child of a 400 MB parent reported 400 MB."""
    import resource

    import numpy as np

    assert bench.peak_rss_mb("Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1024 kB\n") == 200.0
    held = np.ones(400 * 2**20 // 8)  # 400 MB touched in this process
    script = (f"import importlib.util, resource; s = importlib.util.spec_from_file_location('b', {str(ROOT / 'benchmarks' / 'bench.py')!r}); "
              "b = importlib.util.module_from_spec(s); s.loader.exec_module(b); "
              "print(b.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert held.sum() > 0 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 400
    assert own < 200 and inherited > 400  # the check can fail: ru_maxrss is the parent's here


def test_file_backed_rss_is_read_from_proc_status():
    assert bench.file_rss_mb("VmHWM:\t  204800 kB\nRssAnon:\t 1000 kB\nRssFile:\t  153600 kB\n") == 150.0
    assert bench.file_rss_mb("VmHWM:\t  204800 kB\n") is None
    here = bench.file_rss_mb()  # this process maps torch's libraries
    assert here is None or 10 < here < bench.peak_rss_mb()


def test_the_header_states_every_setting_that_changes_the_rows():
    """Each flag that changes how a row runs adds its line or clause to the header (the profiler's
    and --no-varlen's lines follow the settings; both were once left unreachable after a return)."""
    info = bench.cpu_info("model name\t: Some CPU\nflags\t\t: avx2\n")
    plain = "\n".join(bench.header_lines(bench.parse_args([]), info))
    assert "fp32 (TRL bf16=False)" in plain and "SFT right padding" in plain
    assert "PROFILED" not in plain and "--no-varlen" not in plain and "NOT identical" not in plain
    assert "torch.compile" not in plain
    flags = ["--bf16", "--padding-free", "--pairs-padding-free", "--no-varlen", "--compile", "--stages", "sft", "dpo",
             "--profile", "/tmp/p"]
    flagged = bench.header_lines(bench.parse_args(flags), info, peak=989.4)
    text = "\n".join(flagged)
    assert "bf16 autocast (TRL bf16=True)" in text and "TRL padding_free=True" in text
    assert "RM/DPO: NOT identical" in text and "MFU against 989.4 TFLOP/s" in text
    assert flagged[-3].startswith("# ours with --no-varlen") and flagged[-1].startswith("# PROFILED (--profile /tmp/p)")
    assert flagged[-2].startswith("# torch.compile on both sides") and "TRL torch_compile=True" in flagged[-2]
    with pytest.raises(SystemExit):  # PPO refuses compile: the harness says so before any row runs
        bench.parse_args(["--compile", "--stages", "sft", "ppo"])


def test_the_gpu_script_runs_its_parts_in_order_and_every_bench_command_parses(tmp_path):
    """`benchmarks/gpu/run.sh` only runs on a lent GPU, so a renamed bench flag would first show there,
    in minutes that cannot be had back: its dry run here lists each part's command, and each bench
    command must parse. A part asked for is listed; one left out of PARTS is not."""
    import os
    import shlex

    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh")], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}, timeout=60)
    assert run.returncode == 0, run.stderr
    parts = [line[3:].split(",")[0] for line in run.stdout.splitlines() if line.startswith("== ")]
    assert parts == ["gpu-tests", "sft-b256-free", "sft-b256-free-compile", "sft-b128-free", "sft-b128-free-no-varlen",
                     "sft-b256-profile", "sft-b32-profile", "rest-b32"]
    commands = [shlex.split(line.split(": ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("== ")]
    tests = commands[0]  # pytest over the GPU-only tests: torch's varlen kernel, the chunked losses on CUDA
    assert tests[-2:] == ["-k", "varlen or cuda"] and tests[:3] == ["python", "-m", "pytest"]
    files = [a for a in tests if a.endswith(".py")]
    assert len(files) == 3 and all((ROOT / f).is_file() for f in files)
    assert all(argv[:2] == ["python", "benchmarks/bench.py"] for argv in commands[1:])
    by_name = {name: bench.parse_args(argv[2:]) for name, argv in zip(parts[1:], commands[1:])}
    assert all(args.model == "smollm2" and args.bf16 and args.random_init for args in by_name.values())
    assert by_name["sft-b128-free-no-varlen"].no_varlen and not by_name["sft-b128-free"].no_varlen
    assert [name for name, args in by_name.items() if args.compile] == ["sft-b256-free-compile"]
    assert by_name["sft-b256-free"].batch_size == 256 and by_name["sft-b256-free"].padding_free
    # the rows read for MFU and ratios run without the profiler, which slows the steps it watches
    assert [name for name, args in by_name.items() if args.profile] == ["sft-b256-profile", "sft-b32-profile"]
    some = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PARTS": "sft-b256-free"}, timeout=60)
    assert [line[3:].split(",")[0] for line in some.stdout.splitlines() if line.startswith("== ")] == ["sft-b256-free"]


def test_evict_library_pages_asks_about_every_shared_library_in_site_packages_and_nothing_else(tmp_path, monkeypatch):
    """Before the rows the harness drops the page cache's copies of each side's libraries: every
    shared object under the venv's site-packages (plain, versioned, in package folders), not the
    other files there, not a folder named like one, and nothing outside site-packages."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    libs = [site / "torch" / "lib" / "libtorch_cpu.so", site / "pyarrow" / "libarrow.so.2500",
            site / "tokenizers" / "tokenizers.abi3.so"]
    others = [site / "torch" / "__init__.py", site / "torch" / "lib" / "notes.txt", tmp_path / "venv" / "bin" / "x.so"]
    for f in libs + others:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"\0" * 4096)
    (site / "odd.so.d").mkdir()
    asked = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)) or real(fd, offset, length, advice))
    assert bench.evict_library_pages(tmp_path / "venv") == 3
    assert sorted(asked) == sorted((str(f), 0, 0, os.POSIX_FADV_DONTNEED) for f in libs)
