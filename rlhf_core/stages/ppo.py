"""PPO for language models (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

Four models: the actor (from SFT, LoRA optional), the critic (from the reward model, its score
head read at every token as a value, LoRA optional), a frozen reward model and a frozen reference
(the actor with adapters disabled under LoRA, else a frozen copy of SFT). Each iteration samples a
rollout batch, scores it, turns score and per-token KL into token rewards, computes GAE
advantages, then runs `ppo_epochs` passes of clipped policy and value updates over minibatches;
each pass uses every rollout sample once (the last minibatch may be smaller). Actor and critic
are two parameter groups of one optimizer, each with its own learning rate and gradient clip.
Under mixed precision every forward (sampling, experience, reference, reward, value, update)
runs under the same autocast, so the first update of an iteration has ratio 1 and step 0 has KL 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from rlhf_core.config import ModelConfig, PPOConfig
from rlhf_core.data.batching import collate_lm, collate_prompts
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.ops.gae import compute_token_rewards, gae_advantages
from rlhf_core.ops.kl import kl_penalty, make_kl_controller
from rlhf_core.ops.logprobs import entropy_from_logits, scored_mask, selective_log_softmax
from rlhf_core.ops.losses import lm_loss, ppo_policy_loss, ppo_value_loss
from rlhf_core.ops.masked import masked_mean, masked_whiten
from rlhf_core.stages.generation import Rollout, decode_responses, sample
from rlhf_core.training.context import RunContext, StageResult
from rlhf_core.training.frozen import Frozen, reference
from rlhf_core.training.modeling import (
    apply_lora,
    check_tokenizer_fits,
    enable_gradient_checkpointing,
    forward_logits,
    forward_packed_logits,
    last_token_scores,
    load_causal_lm,
    load_scalar_model,
    sparse_tied_embedding_grad,
    token_scores,
)
from rlhf_core.training.optim import (
    check_finite,
    make_optimizer,
    make_scheduler,
    uses_grad_scaler,
)
from rlhf_core.training.progress import Throughput, progress, scalars

RewardFn = Callable[[list[str], list[str]], list[float]]
"""Optional rule-based reward: (prompts, responses) -> scores, used instead of the reward model."""


@dataclass
class Experience:
    """One scored rollout batch, everything detached. Token tensors are (B, R)."""
    rollout: Rollout
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # (B,)
    kl: torch.Tensor


class PackedRollout(NamedTuple):
    """Rows of a rollout laid end to end in one row without padding (`padding_free`): each row's
    real tokens (its prompt without the left padding, its response up to and including the first
    EOS), positions restarting at 0, as `PackedLMBatch`. The outputs at response positions come
    back as (B, R) tensors, zero where `response_mask` is 0."""
    input_ids: torch.Tensor      # (1, N)
    position_ids: torch.Tensor   # (1, N)
    scored: torch.Tensor         # (1, N) bool: the positions that predict a kept response token
    ends: torch.Tensor           # (B,) index of each row's last token
    response_mask: torch.Tensor  # (B, R) bool


def pack_rollout(rollout: Rollout) -> PackedRollout:
    """`rollout` as a `PackedRollout` (a micro-batch's rows: pack its `micro_rollout`)."""
    keep, rmask = rollout.attention_mask.bool(), rollout.response_mask.bool()
    lengths = keep.sum(-1)
    ends = lengths.cumsum(0) - 1
    device = keep.device
    positions = torch.cat([torch.arange(n, device=device) for n in lengths.tolist()])
    # response token j of row i is predicted at its row's start + prompt length - 1 + j
    first = ends + 1 - rmask.sum(-1) - 1
    at = first[:, None] + torch.arange(rmask.shape[1], device=device)
    scored = torch.zeros(int(lengths.sum()), dtype=torch.bool, device=device)
    scored[at[rmask]] = True
    return PackedRollout(rollout.sequences[keep][None], positions[None], scored[None], ends, rmask)


def micro_rollout(rollout: Rollout, rows) -> Rollout:
    """The `rows` of `rollout` without the columns that are padding in every one of them: the
    left padding their longest prompt does not need, and the response slots after all of their
    EOS. A micro-batch is then padded to its own longest row, as a collator pads a batch, not to
    the rollout's. Positions come from the attention mask (`position_ids`), so every output at a
    kept position is the one the full-width rows give; the response tensors keep their first R'
    columns, and everything cut was masked out of every loss and metric."""
    mask = rollout.attention_mask[rows]
    live = mask.bool().any(0)
    P = rollout.prompt_length
    lead = min(int(live[:P].long().argmax()), P - 1)  # one prompt column at least (none cut if no prompt token)
    R = int(live[P:].nonzero().max()) + 1  # the first response token is always kept
    cols = slice(lead, P + R)
    return Rollout(rollout.sequences[rows][:, cols], mask[:, cols], rollout.response_mask[rows][:, :R], P - lead,
                   rollout.has_eos[rows], None if rollout.logprobs is None else rollout.logprobs[rows][:, :R])


def _unpack(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response-token outputs (M,) back to (B, R), zero where `mask` is 0 (keeps the graph)."""
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat)


def response_logprobs(model, rollout: Rollout, temperature: float,
                      packed: PackedRollout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, R, with graph) and entropies (B, R, a metric without graph) of the response
    tokens under `model` at `temperature`. Only the response positions' logits are used, and
    low-precision logits are upcast a row at a time (see `selective_log_softmax`). With `packed`
    (the same rollout, `pack_rollout`) the rows go through end to end, and positions after a
    response's EOS are zero."""
    seq, P = rollout.sequences, rollout.prompt_length
    if packed is not None:
        logits = forward_packed_logits(model, packed.input_ids, packed.position_ids, packed.scored) / temperature
        targets = seq[:, P:][packed.response_mask]
        return (_unpack(selective_log_softmax(logits, targets), packed.response_mask),
                _unpack(entropy_from_logits(logits), packed.response_mask))
    R = seq.shape[1] - P
    # position t predicts t + 1; only the R response-predicting positions are projected
    logits = forward_logits(model, seq, rollout.attention_mask, torch.arange(P - 1, P - 1 + R)) / temperature
    return selective_log_softmax(logits, seq[:, P:]), entropy_from_logits(logits)


def response_values(critic, rollout: Rollout, packed: PackedRollout | None = None) -> torch.Tensor:
    """V(state before response token j), read at the token that precedes it: (B, R); with
    `packed`, zero after a response's EOS."""
    if packed is not None:
        values = token_scores(critic, packed.input_ids, None, packed.position_ids, packed.scored)[0]
        return _unpack(values[packed.scored[0]], packed.response_mask)
    P = rollout.prompt_length
    R = rollout.sequences.shape[1] - P
    at = torch.arange(P - 1, P - 1 + R, device=rollout.sequences.device)
    return token_scores(critic, rollout.sequences, rollout.attention_mask, keep=at)[:, P - 1:P - 1 + R]


def reward_scores(model, rollout: Rollout, packed: PackedRollout | None = None) -> torch.Tensor:
    """A scalar model's output at each sequence's last token: (B,)."""
    if packed is not None:
        return token_scores(model, packed.input_ids, None, packed.position_ids, packed.ends)[0, packed.ends]
    return last_token_scores(model, rollout.sequences, rollout.attention_mask)


@torch.no_grad()
def score_rollout(rollout: Rollout, cfg: PPOConfig, reward_model: Frozen | None, reward_fn: RewardFn | None,
                  tokenizer, packed: PackedRollout | None = None) -> torch.Tensor:
    """Scalar score per sequence: reward model (or rule), clipped, minus the missing-EOS penalty."""
    if reward_fn is not None:
        P = rollout.prompt_length
        prompts = tokenizer.batch_decode(rollout.sequences[:, :P], skip_special_tokens=True)
        scores = torch.tensor(reward_fn(prompts, decode_responses(tokenizer, rollout)), dtype=torch.float)
    else:
        scores = reward_model(reward_scores, rollout, packed).cpu()
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores - cfg.missing_eos_penalty * (~rollout.has_eos).float().cpu()


def rollout_values(critic, rollout: Rollout, packed: PackedRollout | None = None, first: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V at each response position of `rollout`: (B, R), detached, zero where the response mask is 0.
    `packed`: the rollout end to end (`pack_rollout`), and then each part of it too. With `first`
    (the rows of the iteration's first micro-batch) also those rows' values with their
    graph, at `micro_rollout`'s width, forwarded after the other rows': the critic has not stepped
    when the first update reads them, so they are what its forward would compute again, and
    `ppo_update(values=...)` takes them instead (one critic forward fewer per iteration, at the same
    peak memory: the update holds that graph anyway)."""
    mask = rollout.response_mask

    def forward(rows) -> torch.Tensor:
        r = micro_rollout(rollout, rows)
        return response_values(critic, r, packed=pack_rollout(r) if packed is not None else None)

    if first is None:
        with torch.no_grad():
            return response_values(critic, rollout, packed=packed) * mask, None
    others = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    others[first] = False
    others = others.nonzero().flatten()
    parts = []
    if len(others):
        with torch.no_grad():
            parts.append((others, forward(others)))
    with torch.enable_grad():
        live = forward(first)
    values = live.new_zeros(mask.shape)
    for rows, v in (*parts, (first, live.detach())):
        values[rows, :v.shape[1]] = v
    return values * mask, live


@torch.no_grad()
def make_experience(rollout: Rollout, actor, critic, ref: Frozen, scores: torch.Tensor, kl_coef: float,
                    cfg: PPOConfig, total: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    packed: PackedRollout | None = None, first: torch.Tensor | None = None
                    ) -> tuple[Experience, torch.Tensor | None]:
    """The scored rollout, and `rollout_values`' graph-carrying values of the `first` micro-batch.
    `total` sums over processes (`RunContext.total`): advantages are whitened with the statistics
    of every process's rollouts together. `packed`: the whole rollout end to end."""
    mask = rollout.response_mask
    if rollout.logprobs is not None:  # `sampling_logprobs`: already read at sampling
        old_logprobs = rollout.logprobs.to(mask.device) * mask
    else:
        old_logprobs, _ = response_logprobs(actor, rollout, cfg.temperature, packed=packed)
    ref_logprobs = ref(response_logprobs, rollout, cfg.temperature, packed=packed)[0]
    values, live = rollout_values(critic, rollout, packed, first)
    kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = compute_token_rewards(scores.to(kl.device), kl, mask, kl_coef)
    advantages, returns = gae_advantages(values, rewards, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, total=total)
    return Experience(rollout, old_logprobs, ref_logprobs, values, advantages, returns, scores, kl), live


def ppo_update(exp: Experience, rows: torch.Tensor, actor, critic, cfg: PPOConfig, ptx_batch=None, pad_id=0,
               values: torch.Tensor | None = None):
    """Losses of one micro-batch of rollout rows; returns (actor_loss, critic_loss, metrics).
    The critic's parameters are disjoint from the actor's and clipped on their own, so the value
    loss needs no weight against the policy loss. `values`: the rows' values with their graph,
    already forwarded by the unchanged critic (`rollout_values`)."""
    r = micro_rollout(exp.rollout, rows)  # padded to the micro-batch's longest row
    mask = r.response_mask
    R = mask.shape[1]
    packed = pack_rollout(r) if cfg.padding_free else None
    logprobs, entropy = response_logprobs(actor, r, cfg.temperature, packed=packed)
    pg_loss, m = ppo_policy_loss(logprobs, exp.old_logprobs[rows][:, :R], exp.advantages[rows][:, :R], mask,
                                 cfg.clip_eps)
    if values is None:
        values = response_values(critic, r, packed=packed)
    vf_loss, vm = ppo_value_loss(values, exp.old_values[rows][:, :R], exp.returns[rows][:, :R], mask,
                                 cfg.value_clip_eps)
    m.update(vm)
    m["objective/entropy"] = masked_mean(entropy, mask).detach()
    actor_loss = pg_loss
    if ptx_batch is not None:  # InstructGPT PPO-ptx: keep the pretraining (or SFT) likelihood up
        device = logprobs.device
        labels = ptx_batch.labels.to(device)
        logits = forward_logits(actor, ptx_batch.input_ids.to(device), ptx_batch.attention_mask.to(device),
                                scored_mask(labels))
        ptx, _ = lm_loss(logits, labels)
        actor_loss = actor_loss + cfg.ptx_coef * ptx
        m["loss/ptx"] = ptx.detach()
    return actor_loss, vf_loss, m


def minibatches(order: torch.Tensor, minibatch: int, micro: int) -> list[list[torch.Tensor]]:
    """Split a permutation of the rollout rows into minibatches (one optimizer step each) of
    micro-batches: every row exactly once, the last minibatch possibly smaller."""
    return [list(order[s:s + minibatch].split(micro)) for s in range(0, len(order), minibatch)]


def ptx_split(cfg: PPOConfig) -> str | None:
    """Tokenised split that PPO-ptx mixes in: the PT blocks or the SFT chats; None when off."""
    return cfg.ptx_data if cfg.ptx_coef > 0 else None


def run_ppo(ctx: RunContext, cfg: PPOConfig, model_cfg: ModelConfig, reward_fn: RewardFn | None = None) -> StageResult:
    """PPO of the actor `ctx.inputs["init"]`, scored by the reward model `ctx.inputs["reward"]`
    (whose weights also start the critic), or by `reward_fn` (then the critic starts from init)."""
    ctx.seed(cfg.seed)  # each process samples its own responses
    stage, init = ctx.stage, ctx.input("init")
    reward_dir = ctx.inputs.get("reward") if reward_fn is not None else ctx.input("reward")
    tokenizer = load_tokenizer(init, model_cfg.trust_remote_code)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    acc = ctx.accelerator
    actor = load_causal_lm(init, model_cfg)
    check_tokenizer_fits(actor, tokenizer, init)
    actor = apply_lora(actor, cfg.lora)
    critic_src = reward_dir if reward_dir is not None else init
    critic = apply_lora(load_scalar_model(critic_src, model_cfg, pad), cfg.critic_lora, "SEQ_CLS")
    reward_model = None if reward_fn is not None else Frozen(load_scalar_model(reward_dir, model_cfg, pad), ctx.device,
                                                             ctx.autocast)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(actor), enable_gradient_checkpointing(critic)
    prompts = load_split(ctx.input("data"), "prompts", ctx.train_split, vocab_size=len(tokenizer))
    ptx_kind = ptx_split(cfg)
    ptx_data = load_split(ctx.input("data"), ptx_kind, "train", vocab_size=len(tokenizer)) if ptx_kind else None
    minibatch = cfg.batch_size * cfg.grad_accum
    updates_per_iter = cfg.ppo_epochs * -(-cfg.rollout_batch_size // minibatch)  # ceil: a ragged last minibatch
    micro_per_iter = cfg.ppo_epochs * cfg.rollout_batch_size // cfg.batch_size
    opt = make_optimizer(actor.parameters(), cfg.learning_rate, cfg.weight_decay)
    opt.add_param_group({"params": [p for p in critic.parameters() if p.requires_grad], "lr": cfg.critic_learning_rate})
    sched = make_scheduler(opt, cfg, cfg.max_steps * updates_per_iter)
    actor, critic, opt = acc.prepare(actor, critic, opt)
    ref = reference(acc.unwrap_model(actor), lambda: load_causal_lm(init, model_cfg), ctx.device, ctx.autocast)
    sparse_tied_embedding_grad(actor)  # after the reference copies the actor: it only shapes the actor's gradient
    kl_ctl = make_kl_controller(cfg.kl_controller, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    state = {"models": {"actor": acc.unwrap_model(actor), "critic": acc.unwrap_model(critic)},
             "optimizers": {"ppo": opt}, "schedulers": {"ppo": sched}}
    resumed = ctx.resume(state)
    start = 0
    if resumed:
        start = resumed[0]
        kl_ctl.load_state_dict(resumed[1]["kl_controller"])
    prompt_batches = ctx.batches(len(prompts), cfg.rollout_batch_size, cfg.seed, start)
    ptx_batches = ctx.batches(len(ptx_data), cfg.batch_size, cfg.seed + 1, start * micro_per_iter) if ptx_kind else None
    a_params = [p for p in actor.parameters() if p.requires_grad]
    c_params = [p for p in critic.parameters() if p.requires_grad]
    speed, bar, metrics = Throughput(), progress(stage, cfg.max_steps, start, not ctx.is_main_process), {}
    for it in range(start, cfg.max_steps):
        batch = collate_prompts(prompts[next(prompt_batches)], pad)
        with acc.autocast():
            rollout = sample(acc.unwrap_model(actor), batch, eos, pad, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                             cfg.top_p, logprobs=cfg.sampling_logprobs)
            packed = pack_rollout(rollout) if cfg.padding_free else None
            scores = score_rollout(rollout, cfg, reward_model, reward_fn, tokenizer, packed)
            B = rollout.sequences.shape[0]
            order = minibatches(torch.randperm(B).to(acc.device), minibatch, cfg.batch_size)  # the first epoch's
            exp, first_values = make_experience(rollout, actor, critic, ref, scores, kl_ctl.value, cfg, ctx.total,
                                                packed, first=order[0][0])
        sums: dict[str, float] = {}
        n_updates = 0
        for epoch in range(cfg.ppo_epochs):
            if epoch:
                order = minibatches(torch.randperm(B).to(acc.device), minibatch, cfg.batch_size)
            for micro in order:
                for mb in micro:
                    ptx = collate_lm(ptx_data[next(ptx_batches)], pad) if ptx_batches else None
                    with acc.autocast():
                        a_loss, c_loss, m = ppo_update(exp, mb, actor, critic, cfg, ptx, pad, first_values)
                    first_values = None  # only the first micro-batch's were forwarded before a step
                    acc.backward((a_loss + c_loss) / len(micro))
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n_updates += 1
                acc.unscale_gradients()  # fp16: once per step, before either clip
                norm_a = torch.nn.utils.clip_grad_norm_(a_params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                norm_c = torch.nn.utils.clip_grad_norm_(c_params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                scaled = uses_grad_scaler(acc)  # fp16 overflow: the scaler skips this step, expected
                check_finite(stage, it + 1, actor_loss=a_loss.detach(), critic_loss=c_loss.detach(),
                             actor_grad_norm=None if scaled else norm_a, critic_grad_norm=None if scaled else norm_c)
                opt.step()
                if not (scaled and opt.step_was_skipped):
                    sched.step()
                opt.zero_grad(set_to_none=True)
        mask = rollout.response_mask.float()
        kl_seq = exp.kl.sum(-1).mean().item()  # per-sequence KL summed over response tokens
        rlhf_reward = (exp.scores.to(exp.kl.device) - kl_ctl.value * exp.kl.sum(-1)).mean().item()
        metrics = {f"{k}_avg" if k.startswith(("policy/", "loss/")) else k: v / max(1, n_updates) for k, v in sums.items()}
        metrics.update({"objective/kl": kl_seq, "objective/scores": exp.scores.mean().item(),
                        "objective/rlhf_reward": rlhf_reward, "val/response_length": mask.sum(-1).mean().item()})
        # every process holds B rollouts: the mean over processes is the global batch's mean
        metrics = {**ctx.mean_over_processes(metrics), **ctx.sum_over_processes({"val/num_eos_tokens": rollout.has_eos.sum()}),
                   "objective/kl_coef": kl_ctl.value, "train/lr": sched.get_last_lr()[0]}
        kl_seq = metrics["objective/kl"]
        kl_ctl.update(kl_seq, B * ctx.num_processes)
        tps = speed.add(int(rollout.attention_mask.sum()))
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{kl_seq:.3f}", tok_s=f"{tps:.0f}")
        done = it + 1
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps:
            ctx.log(metrics, done)
            ctx.log_timing({"train/tokens_per_second": tps}, done)
        ctx.end_of_step(done, cfg.max_steps, state, extra={"kl_controller": kl_ctl.state_dict()})
    bar.close()
    ctx.save_model(actor, tokenizer, merge_lora=cfg.lora.merge)
    return StageResult(stage, cfg.max_steps, scalars(metrics), speed.timing(), start)
