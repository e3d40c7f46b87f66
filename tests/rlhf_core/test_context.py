"""RunContext: this process's share of the data order, the checkpoint policy with its stop request,
main-process-only writes; Frozen models; and a loop's output as a function of its inputs and seed.

Several processes are simulated by an accelerator stand-in that says which process it is; the
real multi-process run is the scale-out issue's test."""
from __future__ import annotations

import hashlib
import json
import signal
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_sft_project, context

from rlhf_core.config import LoraConfig, ModelConfig, SFTConfig
from rlhf_core.data.batching import index_batches
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.stages import lm
from rlhf_core.training.context import RunContext, StageResult
from rlhf_core.training.frozen import Frozen, reference
from rlhf_core.training.modeling import apply_lora, build_tiny_causal_lm
from rlhf_core.training.stop import Stopped, StopRequest

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)


class Process(SimpleNamespace):
    """The parts of an accelerate.Accelerator the context reads, for process `process_index` of
    `num_processes`; it counts the barriers it reaches."""

    def __init__(self, process_index: int = 0, num_processes: int = 1):
        super().__init__(process_index=process_index, num_processes=num_processes,
                         is_main_process=process_index == 0, device=torch.device("cpu"), barriers=0)

    def wait_for_everyone(self):
        self.barriers += 1

    def unwrap_model(self, model):
        return model

    def gather(self, t):
        """Every simulated process holds what this one holds."""
        return torch.cat([t] * self.num_processes)

    def reduce(self, t, op):
        return t * self.num_processes if op == "sum" else t


@pytest.fixture(autouse=True)
def _gather_objects_of_two_simulated_processes(monkeypatch):
    """accelerate's gather_object needs a real process group; here (at most 2 simulated
    processes) both hold what this one holds."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda items: list(items) * 2)


def _ctx(tmp_path, process_index: int = 0, num_processes: int = 1, **kwargs) -> RunContext:
    return RunContext("sft", {}, tmp_path / "out", tmp_path / "ckpt", "fp", Process(process_index, num_processes),
                      **kwargs)


# --- the data order ----------------------------------------------------------------------------

@pytest.mark.parametrize("start", [0, 7])
def test_two_processes_take_disjoint_halves_of_the_one_process_global_batch(tmp_path, start):
    """n=37 rows, batch 4 per device on 2 processes: at every micro-batch (also from a resumed
    start) rank 0 and rank 1 see 4 rows each, none shared, which together are exactly the 8 rows a
    single process with batch 8 sees; across an epoch boundary too (37 // 8 = 4 batches an epoch)."""
    ranks = [_ctx(tmp_path, r, 2).batches(37, 4, seed=5, start=start) for r in (0, 1)]
    single = index_batches(37, 8, 5, start)
    for _ in range(10):
        a, b, want = next(ranks[0]), next(ranks[1]), next(single)
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == want


def test_one_process_walks_the_plain_seeded_order(tmp_path):
    ours, plain = _ctx(tmp_path).batches(37, 4, seed=5, start=3), index_batches(37, 4, 5, 3)
    assert [next(ours) for _ in range(12)] == [next(plain) for _ in range(12)]


# --- checkpoint policy, stop request, main-process-only writes ----------------------------------

def _state():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"models": {"model": model}, "optimizers": {"opt": opt},
            "schedulers": {"sched": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}}


def _saved_step(ctx: RunContext) -> int | None:
    f = ctx.ckpt_dir / "trainer_state.json"
    return json.loads(f.read_text())["step"] if f.exists() else None


def test_checkpoints_every_save_every_steps_but_not_after_the_last(tmp_path):
    """save_every 2 over 6 steps: checkpoints of steps 2 and 4; step 6 ends the stage (its weights
    become the model), so no checkpoint is written for it."""
    ctx, state = _ctx(tmp_path, save_every=2), _state()
    written = []
    for done in range(1, 7):
        ctx.end_of_step(done, 6, state)
        written.append(_saved_step(ctx))
    assert written == [None, 2, 2, 4, 4, 4]
    assert json.loads((ctx.ckpt_dir / "trainer_state.json").read_text())["fingerprint"] == "fp"


def test_a_stop_request_checkpoints_the_step_and_raises_stopped(tmp_path):
    stop = StopRequest()
    ctx, state = _ctx(tmp_path, save_every=0, stop=stop), _state()
    ctx.end_of_step(1, 5, state)
    assert _saved_step(ctx) is None
    stop.set(signal.SIGTERM)
    with pytest.raises(Stopped, match=r"^sft: stopped by SIGTERM after step 2; its checkpoint is in ") as e:
        ctx.end_of_step(2, 5, state, extra={"k": 1})
    assert e.value.signum == signal.SIGTERM and _saved_step(ctx) == 2
    assert json.loads((ctx.ckpt_dir / "trainer_state.json").read_text())["extra"] == {"k": 1}
    stop.set(None)  # withdrawn: the next step goes on
    ctx.end_of_step(3, 5, state)


def test_only_the_main_process_writes_checkpoints_models_and_logs_and_all_meet_at_a_barrier(tmp_path):
    logged = []
    tok = SimpleNamespace(save_pretrained=lambda path: pytest.fail("a non-main process saved"))
    other = _ctx(tmp_path, 1, 2, save_every=1, log_fn=lambda m, s: logged.append(s),
                 timing_fn=lambda m, s: logged.append(s))
    other.end_of_step(1, 3, _state())
    other.save_model(torch.nn.Linear(2, 2), tok)
    other.log({"train/loss": 1.0}, 1), other.log_timing({"train/tokens_per_second": 9.0}, 1)
    assert not other.ckpt_dir.exists() and not other.out_dir.exists() and logged == []
    assert other.accelerator.barriers == 2
    main = _ctx(tmp_path, 0, 2, save_every=1, log_fn=lambda m, s: logged.append(s))
    main.end_of_step(1, 3, _state())
    main.log({"train/loss": 1.0}, 1)
    assert _saved_step(main) == 1 and logged == [1] and main.accelerator.barriers == 1


def test_a_missing_named_input_is_named(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.inputs["data"] = tmp_path
    with pytest.raises(Exception, match=r"^sft: no 'init' input was given \(inputs: data\)$"):
        ctx.input("init")


# --- Frozen ------------------------------------------------------------------------------------

@contextmanager
def bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def _probe(model, ids):
    """What a frozen call sees: its logits, grad mode, autocast, and the model's training flag."""
    return (model(input_ids=ids).logits, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), model.training)


def test_a_frozen_copy_runs_without_gradients_in_eval_mode_under_the_given_autocast(tmp_path):
    tok = load_tokenizer(build_tiny_sft_project(tmp_path, TINY) / "base")
    model = build_tiny_causal_lm(TINY, tok, seed=1).train()
    frozen = Frozen(model, "cpu", bf16)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    logits, grad, autocast, training = frozen(_probe, torch.tensor([[5, 6, 7]]))
    assert (grad, autocast, training) == (False, True, False) and logits.dtype == torch.bfloat16


def test_the_reference_of_a_lora_policy_is_the_policy_without_adapters_and_leaves_it_training(tmp_path):
    tok = load_tokenizer(build_tiny_sft_project(tmp_path, TINY) / "base")
    base = build_tiny_causal_lm(TINY, tok, seed=1).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    policy = apply_lora(build_tiny_causal_lm(TINY, tok, seed=1), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the model
    policy.train()
    ref = reference(policy, lambda: pytest.fail("LoRA needs no second copy"), "cpu")
    logits, grad, _, training = ref(_probe, ids)
    torch.testing.assert_close(logits, want)
    assert (grad, training) == (False, False)
    assert policy.training, "the policy's own mode is restored after the call"
    with torch.no_grad():
        assert (policy(input_ids=ids).logits - want).abs().max() > 1e-3, "the adapters are on again"


# --- a loop's output is a function of its inputs and seed ---------------------------------------

def test_same_inputs_and_seed_give_the_same_result_and_weights_and_timing_stays_out(tmp_path_factory):
    """Two SFT runs in two folders: equal `to_dict()` and byte-identical weights; the run record
    (seconds, throughput, resume step) is kept apart from it."""
    tiny = build_tiny_sft_project(tmp_path_factory.mktemp("pure"), TINY)
    cfg = SFTConfig(max_steps=3, batch_size=8, save_every=0, eval_every=2, log_every=1, warmup_steps=1)
    results, digests, timings = [], [], []

    def run(name):
        timing = []
        ctx = context("sft", cfg, tiny / name / "out", tiny / name / "ckpt", data=tiny / "tok", init=tiny / "base")
        ctx.timing_fn = lambda m, step: timing.append(step)
        res = lm.run_sft(ctx, cfg, TINY)
        timings.append(timing)
        digests.append(hashlib.sha256((tiny / name / "out" / "model.safetensors").read_bytes()).hexdigest())
        return res
    results = [run("a"), run("b")]
    assert results[0].to_dict() == results[1].to_dict() and digests[0] == digests[1]
    assert set(results[0].to_dict()) == {"stage", "steps", "metrics"}
    assert not any("per_second" in k or "seconds" in k for k in results[0].metrics)
    assert set(results[0].run_record()) == {"wall_seconds", "tokens_per_second", "resumed_from_step"}
    assert timings[0] == [1, 2, 3], "throughput reaches the timing callback at every logged step"
    assert StageResult("x", 1, {"a": 1.0}, {"wall_seconds": 2.0}).to_dict() == {"stage": "x", "steps": 1,
                                                                                 "metrics": {"a": 1.0}}


def test_padding_free_sft_trains_to_the_padded_runs_metrics_and_weights(tmp_path_factory):
    """`sft.padding_free` changes how a batch is laid out, not what is learnt: three steps of the
    loop give the padded run's losses and weights up to float rounding."""
    from safetensors.torch import load_file

    tiny = build_tiny_sft_project(tmp_path_factory.mktemp("packed"), TINY)
    out = {}
    for packed in (False, True):
        cfg = SFTConfig(max_steps=3, batch_size=8, save_every=0, eval_every=0, log_every=1, warmup_steps=1,
                        padding_free=packed)
        name = "packed" if packed else "padded"
        ctx = context("sft", cfg, tiny / name / "out", tiny / name / "ckpt", data=tiny / "tok", init=tiny / "base")
        out[packed] = (lm.run_sft(ctx, cfg, TINY).metrics, load_file(tiny / name / "out" / "model.safetensors"))
    (m_pad, w_pad), (m_packed, w_packed) = out[False], out[True]
    for k in ("train/loss", "eval/loss", "train/grad_norm"):
        assert m_packed[k] == pytest.approx(m_pad[k], abs=1e-5), k
    for name, w in w_pad.items():
        torch.testing.assert_close(w_packed[name], w, atol=1e-5, rtol=1e-4, msg=name)
    assert any((w_pad[n] - load_file(tiny / "base" / "model.safetensors")[n]).abs().max() > 1e-3 for n in w_pad)


END_TO_END = {"padding_free": True}
PAIR_LOOPS = {  # case: (the settings of both runs, the lever the second run adds)
    "rm": ({}, END_TO_END), "dpo": ({"precompute_ref": True}, END_TO_END),
    "dpo-rpo-per-step-reference": ({"precompute_ref": False, "rpo_alpha": 0.5}, END_TO_END),
    "rm-shared-prompt": ({}, {"share_prompt": True}),
    "rm-shared-prompt-one-row": ({}, {"share_prompt": True, "padding_free": True})}


@pytest.mark.parametrize("case", list(PAIR_LOOPS))
def test_padding_free_and_shared_prompt_pairs_train_to_the_padded_runs_metrics_and_weights(tmp_path_factory, case):
    """`rm.padding_free` and `dpo.padding_free` (with the reference precomputed or run at each step,
    and with RPO's per-token NLL), and `rm.share_prompt` (one row per pair, or all pairs in one row
    with `padding_free`): three steps of the loop give the padded run's metrics and weights up to
    float rounding, on batches that do hold padding."""
    from safetensors.torch import load_file

    from rlhf_core.config import DPOConfig, RMConfig
    from rlhf_core.data.batching import collate_pairs
    from rlhf_core.data.splits import load_split
    from rlhf_core.stages import dpo, rm

    stage = case.split("-")[0]
    tiny = build_tiny_sft_project(tmp_path_factory.mktemp(f"packed-{case}"), TINY, pairs=48)
    train = load_split(tiny / "tok", "preference", "train")
    assert not collate_pairs(train[:8], 0).attention_mask.bool().all(), "the pairs vary in length"
    both, lever = PAIR_LOOPS[case]
    out = {}
    for packed in (False, True):
        common = dict(max_steps=3, batch_size=8, save_every=0, eval_every=0, log_every=1, warmup_steps=1,
                      **both, **(lever if packed else {}))
        cfg = RMConfig(**common) if stage == "rm" else DPOConfig(**common)
        name = "packed" if packed else "padded"
        ctx = context(stage, cfg, tiny / name / "out", tiny / name / "ckpt", data=tiny / "tok", init=tiny / "base")
        result = (rm.run_rm if stage == "rm" else dpo.run_dpo)(ctx, cfg, TINY)
        out[packed] = (result.metrics, load_file(tiny / name / "out" / "model.safetensors"))
    (m_pad, w_pad), (m_packed, w_packed) = out[False], out[True]
    assert m_pad.keys() == m_packed.keys() and "train/grad_norm" in m_pad
    for k in m_pad:
        assert m_packed[k] == pytest.approx(m_pad[k], abs=1e-4, rel=1e-4), k
    for name, w in w_pad.items():  # Adam turns rounding in near-zero gradients into up to ~1% of a step (lr 1e-3)
        torch.testing.assert_close(w_packed[name], w, atol=5e-5, rtol=1e-4, msg=name)
    base = load_file(tiny / "base" / "model.safetensors")
    assert any((w_pad[n] - base[n]).abs().max() > 1e-3 for n in w_pad if n in base)


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_the_accelerator_and_dtype_come_from_the_stage_config(tmp_path, precision, dtype):
    ctx = RunContext.create("dpo", SFTConfig(mixed_precision=precision, save_every=7), {"data": tmp_path, "init": None},
                            tmp_path / "out", tmp_path / "ckpt", "fp")
    assert ctx.dtype == dtype and ctx.save_every == 7 and ctx.inputs == {"data": tmp_path}
    assert (ctx.num_processes, ctx.process_index, ctx.is_main_process) == (1, 0, True)
    with ctx.autocast():
        assert torch.is_autocast_enabled("cpu") is (precision == "bf16")


# --- several processes: shares, values, seeds, stopping together ---------------------------------

def test_held_out_rows_are_split_into_contiguous_shares_that_cover_each_row_once(tmp_path):
    """7 rows on 2 processes: 4 + 3; 1 row: the second share is empty; 1 process: all rows."""
    assert [_ctx(tmp_path, r, 2).eval_rows(7) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [_ctx(tmp_path, r, 2).eval_rows(1) for r in (0, 1)] == [[0], []]
    assert _ctx(tmp_path).eval_rows(3) == [0, 1, 2]


def test_values_over_processes_and_the_per_process_seed(tmp_path):
    two = _ctx(tmp_path, 1, 2)  # the stand-in: both processes hold the same values
    assert two.sum_over_processes({"b": 2, "a": 1.5}) == {"a": 3.0, "b": 4.0}
    assert two.mean_over_processes({"a": 1.5}) == {"a": 1.5}
    assert torch.equal(two.total(torch.tensor(3.0)), torch.tensor(6.0))
    one = _ctx(tmp_path)
    assert one.sum_over_processes({"a": torch.tensor(2.5)}) == {"a": 2.5}
    one.seed(7)
    a = torch.rand(2)
    two.seed(6)  # process 1 of seed 6 draws what seed 7 draws on process 0
    assert torch.equal(torch.rand(2), a)


def test_the_stop_decision_goes_through_a_gather_and_a_non_main_process_writes_nothing(tmp_path):
    """The signal is agreed through the accelerator's gather (here a stand-in holding the same on
    both processes); that a request on the main process alone stops the other one is shown by
    the real two-process run in test_distributed.py."""
    stop = StopRequest()
    ctx = _ctx(tmp_path, 1, 2, stop=stop)
    assert ctx.stop_signal() is None
    stop.set(signal.SIGTERM)
    assert ctx.stop_signal() == signal.SIGTERM
    with pytest.raises(Stopped, match="after step 1"):
        ctx.end_of_step(1, 3, _state())
    assert not ctx.ckpt_dir.exists() and ctx.accelerator.barriers == 1  # only the main process writes
