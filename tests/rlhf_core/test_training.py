"""Tiny-model training runs on demo data: PT -> SFT lowers the loss, gradient accumulation is
exact, RM and DPO overfit a small preference set, PPO raises a rule-based score, and an
interrupted SFT run resumes to the same result as an uninterrupted one."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlhf_core.config import (
    DPOConfig,
    LoraConfig,
    ModelConfig,
    PPOConfig,
    PTConfig,
    RMConfig,
    SFTConfig,
    TokenizeConfig,
)
from rlhf_core.data import formats
from rlhf_core.data.batching import collate_lm, collate_pairs
from rlhf_core.data.encoding import tokenize_datasets
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer, train_tokenizer
from rlhf_core.demo import data as demo_data
from rlhf_core.ops.losses import lm_loss
from rlhf_core.stages.dpo import run_dpo
from rlhf_core.stages.lm import run_pt, run_sft
from rlhf_core.stages.ppo import run_ppo
from rlhf_core.stages.rm import run_rm
from rlhf_core.training.modeling import build_tiny_causal_lm, forward_logits

from conftest import context

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)
TOKENIZE = TokenizeConfig(max_length=64, block_size=32, max_prompt_length=32, max_response_length=32)
QUIET = dict(save_every=0, eval_every=0, log_every=1)


class History:
    """A `log` callback that keeps every (step, metrics) it is given."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def __call__(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> SimpleNamespace:
    """Small demo data, a tokenizer trained on it, the full tokenised set and a 32-pair subset."""
    root = tmp_path_factory.mktemp("training")
    demo_data.generate(root / "raw", demo_data.DemoDataConfig(n_pt_docs=60, n_sft=120, n_preferences=64,
                                                             n_prompts=32, n_eval_prompts=4))
    docs = formats.read_pt_documents(root / "raw" / "pt.txt")
    convs = formats.read_conversations(root / "raw" / "sft.jsonl")
    prefs = formats.read_preferences(root / "raw" / "preferences.jsonl")
    prompts = formats.read_prompts(root / "raw" / "prompts.jsonl")
    tok = train_tokenizer(docs + [t.content for c in convs for t in c.turns], TINY.vocab_size)
    tok.save_pretrained(root / "tokenizer")
    manifest = tokenize_datasets(tok, TOKENIZE, root / "tok", pt_docs=docs, conversations=convs,
                                 preferences=prefs, prompts=prompts)
    small = TokenizeConfig(max_length=64, block_size=32, max_prompt_length=32, max_response_length=32,
                           eval_fraction=0.0)
    small_manifest = tokenize_datasets(tok, small, root / "tok_small", preferences=prefs[:32])
    assert small_manifest.datasets["preference"]["train"].records_out == 32
    return SimpleNamespace(root=root, tok=tok, data=root / "tok", small=root / "tok_small", manifest=manifest)


@pytest.fixture(scope="module")
def pt_sft(demo) -> SimpleNamespace:
    """PT from scratch, then SFT on its output; both log every step."""
    root = demo.root
    pt_log, sft_log = History(), History()
    pt_cfg = PTConfig(max_steps=20, batch_size=16, learning_rate=2e-3, warmup_steps=2, **QUIET)
    pt = run_pt(context("pt", pt_cfg, root / "pt", root / "ckpt" / "pt", pt_log, data=demo.data,
                        tokenizer=root / "tokenizer"), pt_cfg, TINY)
    sft_cfg = SFTConfig(max_steps=30, batch_size=16, learning_rate=1e-3, warmup_steps=2, **QUIET)
    sft = run_sft(context("sft", sft_cfg, root / "sft", root / "ckpt" / "sft", sft_log, data=demo.data,
                          init=root / "pt"), sft_cfg, TINY)
    return SimpleNamespace(pt=pt, sft=sft, pt_log=pt_log, sft_log=sft_log, pt_dir=root / "pt", sft_dir=root / "sft")


# --- (a) PT then SFT -------------------------------------------------------------------------

def test_pt_then_sft_lowers_the_loss(pt_sft):
    pt_losses, sft_losses = pt_sft.pt_log.values("train/loss"), pt_sft.sft_log.values("train/loss")
    print(f"\nPT loss {pt_losses[0]:.4f} -> {pt_losses[-1]:.4f}; SFT loss {sft_losses[0]:.4f} -> {sft_losses[-1]:.4f}; "
          f"SFT eval/loss {pt_sft.sft.metrics['eval/loss']:.4f}")
    # every step is logged once, plus the final record with eval metrics
    assert [s for s, _ in pt_sft.sft_log.rows] == list(range(1, 31)) + [30]
    assert pt_losses[-1] < pt_losses[0] - 0.2
    assert sft_losses[-1] < sft_losses[0] - 0.2
    assert pt_sft.sft.metrics["train/loss"] == sft_losses[-1]
    assert pt_sft.sft.steps == 30 and pt_sft.sft.resumed_from_step == 0
    assert pt_sft.sft.metrics["eval/loss"] < sft_losses[0]
    for d in (pt_sft.pt_dir, pt_sft.sft_dir):
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


# --- (b) gradient accumulation ---------------------------------------------------------------

def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_matches_one_big_batch(demo):
    tok = load_tokenizer(demo.root / "tokenizer")
    model = build_tiny_causal_lm(TINY, tok, seed=0)
    rows = load_split(demo.data, "sft", "train")[:8]
    lengths = [len(x) for x in rows["input_ids"]]
    assert len(set(lengths)) > 1  # padding is exercised
    full = collate_lm(rows, tok.pad_token_id)
    n_items = int((full.labels[:, 1:] != -100).sum())
    assert n_items == sum(sum(l != -100 for l in lab[1:]) for lab in rows["labels"])

    model.zero_grad()
    loss, _ = lm_loss(forward_logits(model, full.input_ids, full.attention_mask), full.labels, num_items=n_items)
    loss.backward()
    big = _grads(model)

    def accumulate(num_items):
        model.zero_grad()
        total = 0.0
        for i in range(8):
            b = collate_lm({k: v[i:i + 1] for k, v in rows.items()}, tok.pad_token_id)
            part, _ = lm_loss(forward_logits(model, b.input_ids, b.attention_mask), b.labels, num_items=num_items)
            part.backward()
            total += float(part.detach())
        return total, _grads(model)

    total, small = accumulate(n_items)
    assert total == pytest.approx(float(loss.detach()), abs=1e-5)
    assert big.keys() == small.keys() and len(big) > 0
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6), name
    # dividing each micro-batch by its own token count (a mean of means) is not the same gradient
    _, wrong = accumulate(None)
    assert any(not torch.allclose(big[n], wrong[n] / 8, atol=1e-6) for n in big)


# --- (c) reward model ------------------------------------------------------------------------

def test_reward_model_overfits_32_pairs(demo, pt_sft):
    log = History()
    cfg = RMConfig(max_steps=40, batch_size=32, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant", **QUIET)
    res = run_rm(context("rm", cfg, demo.root / "rm", demo.root / "ckpt" / "rm", log, data=demo.small,
                         init=pt_sft.sft_dir), cfg, TINY)
    acc, losses = log.values("train/accuracy"), log.values("train/loss")
    print(f"\nRM accuracy {acc[0]:.3f} -> {acc[-1]:.3f}; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    # one batch of 32 is the whole training set, so the last step's accuracy is over all of it
    assert res.metrics["train/accuracy"] > 0.9
    assert losses[-1] < 0.5 * losses[0]
    assert res.metrics["train/margin"] > 0
    assert not any(k.startswith("eval/") for k in res.metrics)  # eval_fraction 0: nothing held out


def test_the_reward_model_trains_with_compiled_layers_as_it_does_eager(demo, pt_sft):
    """`compile: true` through the whole RM loop (prepare, steps, a checkpoint, the held-out
    evaluation without gradients, the saved model): the same losses step by step as the eager run,
    to float rounding, and a saved model that loads with the eager one's scores."""
    import torch._dynamo

    from rlhf_core.training.modeling import last_token_scores, load_scalar_model

    runs = []
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        log, name = History(), f"rm-compile-{compiled}"
        cfg = RMConfig(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant",
                       compile=compiled, **{**QUIET, "save_every": 2})
        run_rm(context("rm", cfg, demo.root / name, demo.root / "ckpt" / name, log, data=demo.small,
                       init=pt_sft.sft_dir), cfg, TINY)
        assert (demo.root / "ckpt" / name).is_dir()
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compiled  # compiled only when asked
        runs.append((log.values("train/loss"), load_scalar_model(demo.root / name, TINY, 0)))
    (eager_losses, eager), (compiled_losses, compiled) = runs
    assert len(eager_losses) == 4  # three steps and the final record
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    ids, mask = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(last_token_scores(compiled, ids, mask), last_token_scores(eager, ids, mask),
                                   atol=1e-4, rtol=1e-4)


# --- (d) DPO ---------------------------------------------------------------------------------

def test_dpo_overfits_32_pairs(demo, pt_sft):
    log = History()
    cfg = DPOConfig(max_steps=30, batch_size=32, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant",
                    beta=0.1, **QUIET)
    res = run_dpo(context("dpo", cfg, demo.root / "dpo", demo.root / "ckpt" / "dpo", log, data=demo.small,
                          init=pt_sft.sft_dir), cfg, TINY)
    acc, losses = log.values("train/rewards/accuracies"), log.values("train/loss")
    print(f"\nDPO rewards/accuracies {acc[0]:.3f} -> {acc[-1]:.3f}; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    # at step 1 the policy is the reference: loss = log 2, no pair is ranked yet
    assert losses[0] == pytest.approx(0.693147, abs=1e-4) and acc[0] == 0.0
    assert res.metrics["train/rewards/accuracies"] > 0.9
    assert res.metrics["train/rewards/margins"] > 0
    assert losses[-1] < 0.3


# --- (e) PPO with a rule-based reward --------------------------------------------------------

def short_answer_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Shorter is better: -1 per 40 characters."""
    assert len(prompts) == len(responses)
    return [-len(r) / 40 for r in responses]


def test_ppo_raises_a_rule_based_score(demo, pt_sft):
    log = History()
    cfg = PPOConfig(max_steps=14, batch_size=8, rollout_batch_size=16, ppo_epochs=4, learning_rate=3e-3,
                    warmup_steps=0, lr_scheduler="constant", kl_coef=0.0, max_new_tokens=16, **QUIET)
    res = run_ppo(context("ppo", cfg, demo.root / "ppo", demo.root / "ckpt" / "ppo", log, data=demo.data,
                          init=pt_sft.sft_dir), cfg, TINY, reward_fn=short_answer_reward)
    scores, lengths = log.values("objective/scores"), log.values("val/response_length")
    first, last = sum(scores[:2]) / 2, sum(scores[-2:]) / 2
    print(f"\nPPO objective/scores first2 {first:.3f} -> last2 {last:.3f}; "
          f"response length {lengths[0]:.2f} -> {lengths[-1]:.2f}")
    assert len(scores) == 14
    assert last > first + 0.3
    assert sum(lengths[-2:]) < sum(lengths[:2])
    assert res.metrics["objective/kl_coef"] == 0.0
    assert (demo.root / "ppo" / "model.safetensors").is_file()


# --- (f) resume ------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_interrupted_sft_resumes_to_the_same_result(demo, pt_sft):
    root = demo.root / "resume"
    cfg = SFTConfig(max_steps=8, batch_size=8, learning_rate=1e-3, warmup_steps=2, save_every=4, eval_every=0,
                    log_every=1)

    def run(name, log):
        return run_sft(context("sft", cfg, root / name / "out", root / name / "ckpt", log, data=demo.data,
                               init=pt_sft.pt_dir), cfg, TINY)

    straight_log = History()
    straight = run("straight", straight_log)

    def crash_after_checkpoint(metrics, step):
        if step == 5:  # the checkpoint of step 4 is on disk, step 5 is lost
            raise Crash
    with pytest.raises(Crash):
        run("resumed", crash_after_checkpoint)
    state = json.loads((root / "resumed" / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert not (root / "resumed" / "out").exists()

    resumed_log = History()
    resumed = run("resumed", resumed_log)
    print(f"\nresume: straight train/loss {straight.metrics['train/loss']:.6f} eval/loss "
          f"{straight.metrics['eval/loss']:.6f}; resumed {resumed.metrics['train/loss']:.6f} "
          f"{resumed.metrics['eval/loss']:.6f}")
    assert resumed.resumed_from_step == 4 and straight.resumed_from_step == 0
    assert [s for s, _ in resumed_log.rows] == [5, 6, 7, 8, 8]
    for key in ("train/loss", "eval/loss"):
        assert abs(resumed.metrics[key] - straight.metrics[key]) < 1e-5, key
    assert resumed_log.values("train/loss") == pytest.approx(straight_log.values("train/loss")[4:], abs=1e-5)
    assert resumed.metrics["train/lr"] == pytest.approx(straight.metrics["train/lr"])


def test_a_requested_stop_checkpoints_the_current_step_and_resumes_from_it(demo, pt_sft):
    """What SIGTERM does through the CLI: the step in progress is finished and checkpointed even
    between `save_every` checkpoints, the loop raises Stopped, and the next run resumes there."""
    import signal

    from rlhf_core.training.stop import Stopped, StopRequest

    root = demo.root / "stop"
    cfg = SFTConfig(max_steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=2, save_every=4, eval_every=0,
                    log_every=1)

    def run(name, log, stop=None):
        ctx = context("sft", cfg, root / name / "out", root / name / "ckpt", log, data=demo.data, init=pt_sft.pt_dir)
        ctx.stop = stop or ctx.stop
        return run_sft(ctx, cfg, TINY)

    straight = run("straight", History())
    stop = StopRequest()

    def preempt_during_step_3(metrics, step):
        if step == 3:
            stop.set(signal.SIGTERM)
    with pytest.raises(Stopped, match=r"sft: stopped by SIGTERM after step 3; its checkpoint is in .*ckpt") as e:
        run("stopped", preempt_during_step_3, stop)
    assert e.value.signum == signal.SIGTERM
    assert json.loads((root / "stopped" / "ckpt" / "trainer_state.json").read_text())["step"] == 3
    assert not (root / "stopped" / "out").exists()
    resumed = run("stopped", History())
    assert resumed.resumed_from_step == 3
    assert resumed.metrics["train/loss"] == pytest.approx(straight.metrics["train/loss"], abs=1e-5)
    assert resumed.metrics["eval/loss"] == pytest.approx(straight.metrics["eval/loss"], abs=1e-5)


def test_interrupted_ppo_resumes_with_its_adaptive_kl_coefficient(demo, pt_sft):
    """The adaptive controller's coefficient lives only in the checkpoint's extra state: a resume
    that forgot it would restart from kl_coef and drift from the uninterrupted run."""
    root = demo.root / "resume_ppo"
    cfg = PPOConfig(max_steps=4, batch_size=8, rollout_batch_size=8, ppo_epochs=1, learning_rate=1e-3,
                    warmup_steps=0, max_new_tokens=6, kl_coef=0.2, kl_controller="adaptive", kl_target=0.01,
                    kl_horizon=50, save_every=2, eval_every=0, log_every=1)

    def run(name, log):
        return run_ppo(context("ppo", cfg, root / name / "out", root / name / "ckpt", log, data=demo.data,
                               init=pt_sft.sft_dir), cfg, TINY, reward_fn=short_answer_reward)

    straight_log = History()
    straight = run("straight", straight_log)

    def crash_after_checkpoint(metrics, step):
        if step == 3:  # the checkpoint of iteration 2 is on disk
            raise Crash
    with pytest.raises(Crash):
        run("resumed", crash_after_checkpoint)
    resumed_log = History()
    resumed = run("resumed", resumed_log)
    coefs = straight_log.values("objective/kl_coef")
    assert coefs[2] != coefs[0], "the controller moved the coefficient before the checkpoint"
    assert resumed.resumed_from_step == 2
    assert resumed_log.values("objective/kl_coef") == pytest.approx(coefs[2:], abs=1e-9)
    for key in ("objective/scores", "objective/kl", "loss/value_avg"):
        assert resumed.metrics[key] == pytest.approx(straight.metrics[key], abs=1e-5), key


# --- LoRA on the from-scratch tiny model -----------------------------------------------------

def test_pt_with_lora_from_scratch_saves_merged_weights_that_the_next_stage_loads(demo):
    """`pt.lora.enabled` on the tiny model built from scratch: its base weights exist nowhere else,
    so the adapters are merged and plain weights saved. SFT then loads them: the LoRA-targeted
    projections moved away from the seed's initialisation and nothing else did."""
    from rlhf_core.training.modeling import build_tiny_causal_lm, load_causal_lm

    root = demo.root / "pt_lora"
    cfg = PTConfig(max_steps=2, batch_size=8, warmup_steps=0, lora=LoraConfig(enabled=True, r=4), **QUIET)
    run_pt(context("pt", cfg, root / "out", root / "ckpt", data=demo.data, tokenizer=demo.root / "tokenizer"), cfg, TINY)
    assert (root / "out" / "model.safetensors").is_file() and not (root / "out" / "adapter_config.json").exists()
    trained = load_causal_lm(root / "out", TINY).state_dict()  # what run_sft uses
    init = build_tiny_causal_lm(TINY, demo.tok, cfg.seed).state_dict()
    assert trained.keys() == init.keys()
    moved = {k for k in init if not torch.equal(trained[k], init[k])}
    assert moved and all(k.endswith(tuple(f"{m}.weight" for m in cfg.lora.target_modules)) for k in moved), moved


# --- LoRA references and PPO-ptx ---------------------------------------------------------------

def test_dpo_with_lora_uses_the_disabled_adapters_as_reference(demo, pt_sft):
    """Under LoRA there is no second model: at step 0 the policy equals the reference, so the
    first loss is exactly ln 2, and only adapters are saved."""
    log = History()
    cfg = DPOConfig(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, precompute_ref=False,
                    lora=LoraConfig(enabled=True, r=4, alpha=8), **QUIET)
    run_dpo(context("dpo", cfg, demo.root / "dpo_lora", demo.root / "ckpt" / "dpo_lora", log, data=demo.small,
                    init=pt_sft.sft_dir), cfg, TINY)
    assert log.values("train/loss")[0] == pytest.approx(0.693147, abs=1e-5)
    assert (demo.root / "dpo_lora" / "adapter_model.safetensors").is_file()
    assert not (demo.root / "dpo_lora" / "model.safetensors").exists()


@pytest.mark.parametrize("ptx_data", ["pt", "sft"])
def test_ppo_with_lora_and_ptx_mixes_the_chosen_lm_loss_into_the_actor(demo, pt_sft, ptx_data):
    """The first PPO-ptx loss is the SFT model's LM loss on the first batch of the chosen split
    (under LoRA the actor starts as the SFT model: the adapters' B is zero)."""
    from rlhf_core.data.batching import index_batches
    from rlhf_core.training.modeling import load_causal_lm

    log = History()
    cfg = PPOConfig(max_steps=2, batch_size=8, rollout_batch_size=8, ppo_epochs=1, learning_rate=1e-3,
                    warmup_steps=0, max_new_tokens=6, ptx_coef=0.5, ptx_data=ptx_data, kl_controller="adaptive",
                    kl_target=1.0, lora=LoraConfig(enabled=True, r=4, alpha=8, merge=True), **QUIET)
    res = run_ppo(context("ppo", cfg, demo.root / f"ppo_ptx_{ptx_data}", demo.root / "ckpt" / f"ppo_ptx_{ptx_data}",
                          log, data=demo.data, init=pt_sft.sft_dir), cfg, TINY, reward_fn=short_answer_reward)
    rows = load_split(demo.data, ptx_data, "train")
    first = collate_lm(rows[next(index_batches(len(rows), 8, cfg.seed + 1))], demo.tok.pad_token_id)
    with torch.no_grad():
        want, _ = lm_loss(forward_logits(load_causal_lm(pt_sft.sft_dir, TINY).eval(), first.input_ids,
                                         first.attention_mask), first.labels)
    ptx = log.values("loss/ptx_avg")
    assert len(ptx) == 2 and ptx[0] == pytest.approx(float(want), abs=1e-5), (ptx, float(want))
    assert res.metrics["objective/kl_coef"] != 0.05, "the adaptive controller moved the coefficient"
    assert (demo.root / f"ppo_ptx_{ptx_data}" / "model.safetensors").is_file(), "merge=True saves plain weights"


# --- PPO: precision and minibatches ----------------------------------------------------------

class Updates:
    """Wraps `ppo.ppo_update` to record each micro-batch's rows, metrics and autocast state."""

    def __init__(self, monkeypatch):
        import rlhf_core.stages.ppo as ppo

        self.calls: list[dict] = []
        original = ppo.ppo_update

        def record(exp, rows, *args, **kwargs):
            a_loss, c_loss, m = original(exp, rows, *args, **kwargs)
            self.calls.append({"rows": rows.tolist(), "m": {k: float(v) for k, v in m.items()},
                               "autocast": torch.is_autocast_enabled("cpu")})
            return a_loss, c_loss, m

        monkeypatch.setattr(ppo, "ppo_update", record)


@pytest.mark.parametrize("precision,padding_free,sampled", [("no", False, False), ("bf16", False, False),
                                                             ("no", True, False), ("no", False, True),
                                                             ("no", True, True)])
def test_ppo_first_minibatch_has_ratio_one_and_zero_kl(demo, pt_sft, monkeypatch, precision, padding_free, sampled):
    """Before any update the actor is the policy that sampled and scored the rollout, and the
    reference is the same weights: ratio exp(logp - logp_old) == 1 and KL == 0 exactly, also when
    every forward runs under bf16 autocast (experience, reference and update alike); and when the
    rollout goes through end to end (`padding_free`: the experience packs all rows, each update
    its micro-batch's), or the old log-probs come from sampling (`sampling_logprobs`: the KV-cached
    incremental forward), the ratio is 1 and the KL 0 up to float rounding."""
    updates, log = Updates(monkeypatch), History()
    cfg = PPOConfig(max_steps=1, batch_size=4, rollout_batch_size=8, ppo_epochs=1, warmup_steps=0,
                    max_new_tokens=8, mixed_precision=precision, padding_free=padding_free,
                    sampling_logprobs=sampled, **QUIET)
    name = f"ppo_{precision}" + ("_packed" if padding_free else "") + ("_sampled" if sampled else "")
    run_ppo(context("ppo", cfg, demo.root / name, demo.root / "ckpt" / name, log,
                    data=demo.data, init=pt_sft.sft_dir), cfg, TINY, reward_fn=short_answer_reward)
    first = updates.calls[0]
    assert first["autocast"] is (precision == "bf16")
    assert first["m"]["policy/clipfrac"] == 0.0
    if padding_free or sampled:
        # packed, a row's attention runs over a different row in the experience (all 8 rows end to
        # end) than in the update (its micro-batch's 4); sampled, over a KV cache a token at a time:
        # the log-probs agree to float rounding only
        assert first["m"]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
        assert 0 <= first["m"]["policy/approxkl"] < 1e-10
    else:
        assert first["m"]["val/ratio"] == 1.0 and first["m"]["policy/approxkl"] == 0.0
    kl = log.values("objective/kl")
    assert kl == [0.0] if not sampled else abs(kl[0]) < 1e-4


@pytest.mark.parametrize("lever", ["padding_free", "sampling_logprobs", "first_values"])
def test_ppo_levers_train_to_the_plain_runs_metrics_and_weights(demo, pt_sft, lever, monkeypatch):
    """`ppo.padding_free` changes how the rollout's forwards are laid out, `ppo.sampling_logprobs`
    where the old log-probs come from, the first micro-batch's values forwarded once at the
    experience (`rollout_values(first=...)`, always on; off here by hand: the first update forwards
    them again) how often the critic runs, not what is learnt: three iterations (sampling, reward
    model, reference, critic, two epochs of updates) give the plain run's metrics and actor weights
    up to float rounding, on rollouts that hold padding (prompts of several lengths, responses that
    stop at EOS or not). Weights: Adam divides each update by the root of its second moment, so a
    rounding-level gradient difference on a weight that barely moves can become a visible part of
    that weight's move (2.6e-5 on an embedding weight, about 2.6 learning rates); so the bound is
    on the whole model: the two runs' weights lie within 1e-3 of how far the plain run moved them
    from the SFT model (measured: 5e-5 padding-free, 1.2e-5 sampled)."""
    from safetensors.torch import load_file

    out = {}
    init = load_file(pt_sft.sft_dir / "model.safetensors")
    import rlhf_core.stages.ppo as ppo

    make_experience = ppo.make_experience
    for on in (False, True):
        log, name = History(), f"ppo_{lever}_{on}"
        if lever == "first_values":
            monkeypatch.setattr(ppo, "make_experience", make_experience if on else
                                lambda *a, first=None, **kw: make_experience(*a, **kw))
        flags = {} if lever == "first_values" else {lever: on}
        cfg = PPOConfig(max_steps=3, batch_size=4, rollout_batch_size=8, ppo_epochs=2, warmup_steps=0,
                        max_new_tokens=8, **flags, **QUIET)
        # the SFT model as the reward model too: its score head starts from the run's seed
        res = run_ppo(context("ppo", cfg, demo.root / name, demo.root / "ckpt" / name, log, data=demo.data,
                              init=pt_sft.sft_dir, reward=pt_sft.sft_dir), cfg, TINY)
        out[on] = (res.metrics, load_file(demo.root / name / "model.safetensors"))
    (m_plain, w_plain), (m_lever, w_lever) = out[False], out[True]
    assert m_plain.keys() == m_lever.keys() and "objective/scores" in m_plain
    assert m_plain["val/response_length"] < 8 or m_plain["val/num_eos_tokens"] < 8  # some response is cut or short
    for k in m_plain:
        assert m_lever[k] == pytest.approx(m_plain[k], abs=1e-4, rel=1e-4), k
    moved = torch.cat([(w_plain[n] - init[n]).flatten() for n in w_plain]).norm()
    apart = torch.cat([(w_lever[n] - w_plain[n]).flatten() for n in w_plain]).norm()
    assert moved > 1e-3
    assert apart <= 1e-3 * moved, (float(apart), float(moved))


def test_ppo_uses_every_rollout_sample_once_per_epoch_with_a_ragged_last_minibatch(demo, pt_sft, monkeypatch):
    """rollout 12, micro-batch 4 x accumulation 2: minibatches of 8 and 4 rows, so each epoch
    sees all 12 rows once and takes 2 optimizer steps (the old loop took one and dropped 4 rows)."""
    from rlhf_core.stages.ppo import minibatches

    split = minibatches(torch.arange(10), 4, 2)
    assert [[mb.tolist() for mb in micro] for micro in split] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]]

    updates, log = Updates(monkeypatch), History()
    cfg = PPOConfig(max_steps=1, batch_size=4, grad_accum=2, rollout_batch_size=12, ppo_epochs=2,
                    warmup_steps=0, lr_scheduler="constant", max_new_tokens=6, **QUIET)
    run_ppo(context("ppo", cfg, demo.root / "ppo_ragged", demo.root / "ckpt" / "ppo_ragged", log, data=demo.data,
                    init=pt_sft.sft_dir), cfg, TINY, reward_fn=short_answer_reward)
    rows = [c["rows"] for c in updates.calls]
    assert [len(r) for r in rows] == [4, 4, 4] * 2
    for epoch in (rows[:3], rows[3:]):
        assert sorted(i for r in epoch for i in r) == list(range(12))


def test_ppo_with_a_lora_reward_model_and_a_lora_critic(demo, pt_sft, monkeypatch):
    """RM under LoRA saves only its adapter (and score head); PPO loads it as the frozen reward
    model and as a critic that trains new LoRA adapters and its score head."""
    import json

    import rlhf_core.stages.ppo as ppo
    from rlhf_core.stages.rm import pair_rewards
    from rlhf_core.training.modeling import load_scalar_model

    rm_dir = demo.root / "rm_lora"
    rm_cfg = RMConfig(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0,
                      lora=LoraConfig(enabled=True, r=4, alpha=8), **QUIET)
    res = run_rm(context("rm", rm_cfg, rm_dir, demo.root / "ckpt" / "rm_lora", data=demo.small, init=pt_sft.sft_dir),
                 rm_cfg, TINY)
    assert (rm_dir / "adapter_model.safetensors").is_file() and not (rm_dir / "model.safetensors").exists()
    assert json.loads((rm_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(pt_sft.sft_dir)
    from safetensors.torch import load_file

    rm = load_scalar_model(rm_dir, TINY, demo.tok.pad_token_id).eval()
    saved = load_file(rm_dir / "adapter_model.safetensors")
    score = [v for k, v in saved.items() if "score" in k]
    assert len(score) == 1 and torch.equal(rm.score.weight, score[0]), "the trained score head was loaded"
    pairs = collate_pairs(load_split(demo.small, "preference", "train")[:8], demo.tok.pad_token_id)
    with torch.no_grad():
        rc, rr = pair_rewards(rm, pairs, "cpu")
    assert torch.isfinite(rc).all() and res.steps == 3

    critics = []
    original = ppo.apply_lora
    monkeypatch.setattr(ppo, "apply_lora", lambda m, lora, task="CAUSAL_LM": critics.append(original(m, lora, task))
                        or critics[-1])
    log = History()
    cfg = PPOConfig(max_steps=1, batch_size=4, rollout_batch_size=8, ppo_epochs=1, warmup_steps=0, max_new_tokens=6,
                    critic_lora=LoraConfig(enabled=True, r=4, alpha=8), **QUIET)
    run_ppo(context("ppo", cfg, demo.root / "ppo_rm_lora", demo.root / "ckpt" / "ppo_rm_lora", log, data=demo.data,
                    init=pt_sft.sft_dir, reward=rm_dir), cfg, TINY)
    critic = critics[-1]
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)
    assert log.values("objective/kl") == [0.0] and log.values("objective/scores")


def test_a_reward_model_trains_from_an_sft_lora_adapter(demo, pt_sft):
    """SFT under LoRA saves only a causal-LM adapter; the RM (a sequence classifier) must start
    from it: the adapter is merged into the classifier's backbone, whose logits then match."""
    from rlhf_core.training.modeling import apply_lora, load_causal_lm, load_scalar_model, save_model

    sft = apply_lora(load_causal_lm(pt_sft.sft_dir, TINY), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # an adapter that changes the model
    save_model(sft, demo.tok, demo.root / "sft_lora")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    rm = load_scalar_model(demo.root / "sft_lora", TINY, demo.tok.pad_token_id).eval()
    merged = load_causal_lm(demo.root / "sft_lora", TINY).eval()
    plain = load_scalar_model(pt_sft.sft_dir, TINY, demo.tok.pad_token_id).eval()
    with torch.no_grad():
        hidden = rm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = merged.model(input_ids=ids, attention_mask=mask).last_hidden_state
        base = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-5)
    assert (hidden - base).abs().max() > 1e-3, "the adapter was applied"
