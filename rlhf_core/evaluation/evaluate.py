"""Compare trained policies with the reference (SFT) on held-out prompts.

Every policy answers each prompt once greedily and `num_samples` times at `temperature`. The
sampled answers are scored by the judge, by the policy reward model, and by how far the policy
moved from the reference (a sampled estimate of KL(policy || reference) per answer). The judge is
something no policy trained against: the demo task's oracle, or a reward model trained on a
held-out share of the preference data (Gao et al. 2022's "gold" RM, at this scale), or any
sequence-classification model the user names. Each policy's log-ratio to the reference is also
checked against held-out preference pairs (does it prefer the chosen answer?).
Sampling is re-seeded with `cfg.seed` before each policy, so a policy's numbers do not depend on
which other policies are evaluated with it, or in which order.

Answers are laid out prompt-major: answer row `i * K + k` is sample `k` of prompt `i` (K = 1 for
greedy answers), so row r of one policy and row r of the reference answer the same prompt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch

from rlhf_core.config import EvalConfig, ModelConfig
from rlhf_core.data.batching import PromptBatch, collate_pairs, collate_prompts
from rlhf_core.data.encoding import encode_prompt, render_ids
from rlhf_core.data.formats import Prompt, Turn
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.stages.dpo import precompute_reference
from rlhf_core.stages.generation import Rollout, decode_responses, sample
from rlhf_core.stages.ppo import response_logprobs
from rlhf_core.stages.rm import pair_rewards
from rlhf_core.training.frozen import Frozen, freeze
from rlhf_core.training.modeling import last_token_scores, load_policy, load_scalar_model

TextScore = Callable[[str, str], float]
"""(question text, answer text) -> score, e.g. `oracle.score`."""

NUM_EXAMPLES = 3
"""Prompts per policy shown in `examples`."""

RESERVED_NAMES = ("rm", "examples", "judge")
"""Top-level keys of the result that a policy may not be called."""


class Answers(NamedTuple):
    """One policy's answers to all prompts, prompt-major (row i * K + k is sample k of prompt i)."""
    texts: list[str]         # (N * K,) decoded answers
    rollouts: list[Rollout]  # one per generation batch; their rows concatenate to `texts`


class SampleStats(NamedTuple):
    """Numbers per sampled answer of one policy, each a float tensor (N * K,)."""
    judge: torch.Tensor   # judge score
    reward: torch.Tensor  # reward-model score
    kl: torch.Tensor      # sum over response tokens of log p_policy - log p_reference
    length: torch.Tensor  # response tokens, EOS included
    eos: torch.Tensor     # 1.0 if the answer emitted EOS


class PolicyEval(NamedTuple):
    """Everything measured for one policy."""
    greedy_texts: list[str]     # (N,)
    greedy_judge: torch.Tensor  # (N,)
    sample_texts: list[str]     # (N * K,)
    stats: SampleStats


# --- judges ----------------------------------------------------------------------------------

class Judge(Protocol):
    """Scores answers: `judge(prompts, answers, repeats)` -> (len(answers.texts),) float64, where
    answer r answers prompts[r // repeats]. `name` is what the report calls it."""
    name: str

    def __call__(self, prompts: Sequence[Prompt], answers: Answers, repeats: int) -> torch.Tensor: ...


class TextJudge:
    """A judge that reads the question and the answer text, e.g. the demo task's oracle."""

    def __init__(self, name: str, score: TextScore):
        self.name, self.score = name, score

    def __call__(self, prompts: Sequence[Prompt], answers: Answers, repeats: int) -> torch.Tensor:
        return judge_answers(self.score, [prompt_text(p) for p in prompts], answers.texts, repeats)


class RolloutRMJudge:
    """A reward model that shares the policies' tokenizer (the held-out judge RM): it scores the
    sampled token ids themselves, at the last attended token, exactly as PPO's reward does."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def __call__(self, prompts: Sequence[Prompt], answers: Answers, repeats: int) -> torch.Tensor:
        return torch.cat([reward_scores(self.model, r) for r in answers.rollouts]).double()


class TextRMJudge:
    """A reward model with its own tokenizer: each (prompt, answer) is rendered with its chat
    template and scored at the last token."""

    def __init__(self, name: str, model, tokenizer, batch_size: int = 8):
        self.name, self.model, self.tokenizer, self.batch_size = name, model, tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], answers: Answers, repeats: int) -> torch.Tensor:
        rows = [render_ids(self.tokenizer, (*prompts[r // repeats].messages, Turn("assistant", t)))
                for r, t in enumerate(answers.texts)]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(rows), self.batch_size):
            batch = collate_prompts({"prompt_ids": rows[start:start + self.batch_size]}, self.tokenizer.pad_token_id)
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            out.append(last_token_scores(self.model, ids, mask).double().cpu())
        return torch.cat(out)


# --- prompts ---------------------------------------------------------------------------------

def prompt_text(prompt: Prompt) -> str:
    """The content of the prompt's last user turn: the question the judge reads."""
    for turn in reversed(prompt.messages):
        if turn.role == "user":
            return turn.content
    raise ValueError("prompt has no user turn")


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_prompt_length: int) -> list[list[int]]:
    """Chat-template token ids of each prompt with the generation prompt, keeping the last
    `max_prompt_length` tokens."""
    return [encode_prompt(tokenizer, p, max_prompt_length)[0] for p in prompts]


def prompt_batches(prompt_ids: list[list[int]], batch_size: int, repeats: int, pad_id: int) -> Iterator[PromptBatch]:
    """Left-padded batches of `batch_size` prompts, each prompt repeated `repeats` times in a
    row: input_ids and attention_mask (b * repeats, P)."""
    for start in range(0, len(prompt_ids), batch_size):
        rows = [ids for ids in prompt_ids[start:start + batch_size] for _ in range(repeats)]
        yield collate_prompts({"prompt_ids": rows}, pad_id)


# --- generation and scoring ------------------------------------------------------------------

@torch.no_grad()
def generate_answers(model, tokenizer, prompt_ids: list[list[int]], cfg: EvalConfig, greedy: bool) -> Answers:
    """One greedy answer per prompt, or `cfg.num_samples` sampled answers per prompt at
    `cfg.temperature`. Sampling first seeds torch with `cfg.seed`, so it is reproducible."""
    repeats = 1 if greedy else cfg.num_samples
    if not greedy:
        torch.manual_seed(cfg.seed)
    texts: list[str] = []
    rollouts: list[Rollout] = []
    for batch in prompt_batches(prompt_ids, max(1, cfg.batch_size), repeats, tokenizer.pad_token_id):
        rollout = sample(model, batch, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.max_new_tokens,
                         temperature=cfg.temperature, greedy=greedy)
        rollouts.append(rollout)
        texts += decode_responses(tokenizer, rollout)
    return Answers(texts, rollouts)


def judge_answers(judge: TextScore, questions: Sequence[str], texts: Sequence[str], repeats: int) -> torch.Tensor:
    """Judge score of each answer, answer r answering question r // repeats: (len(texts),) float64."""
    return torch.tensor([float(judge(questions[r // repeats], t)) for r, t in enumerate(texts)], dtype=torch.float64)


@torch.no_grad()
def reward_scores(reward_model, rollout: Rollout) -> torch.Tensor:
    """Reward-model score of each row, read at its last attended token (the EOS if any): (B,)."""
    return last_token_scores(reward_model, rollout.sequences, rollout.attention_mask).float().cpu()


@torch.no_grad()
def sequence_kl(policy, reference, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Sum over response tokens of log p_policy(y_t) - log p_reference(y_t), both at
    `temperature`: (B,). Averaged over answers sampled from the policy, it estimates
    KL(policy || reference) per answer."""
    logp, _ = response_logprobs(policy, rollout, temperature)        # (B, R)
    ref_logp, _ = response_logprobs(reference, rollout, temperature)  # (B, R)
    return ((logp - ref_logp) * rollout.response_mask).sum(-1).float().cpu()


def sample_stats(answers: Answers, judge_scores: torch.Tensor, policy, reference, reward_model,
                 temperature: float, is_reference: bool) -> SampleStats:
    """Per-answer reward, KL (exactly 0 for the reference itself), length and EOS: each (N * K,)."""
    rollouts = answers.rollouts
    reward = torch.cat([reward_scores(reward_model, r) for r in rollouts])
    if is_reference:
        kl = torch.zeros_like(reward)
    else:
        kl = torch.cat([sequence_kl(policy, reference, r, temperature) for r in rollouts])
    length = torch.cat([r.response_mask.sum(-1).float().cpu() for r in rollouts])
    eos = torch.cat([r.has_eos.float().cpu() for r in rollouts])
    return SampleStats(judge_scores, reward, kl, length, eos)


def evaluate_policy(model, reference, reward_model, tokenizer, prompt_ids: list[list[int]], prompts: Sequence[Prompt],
                    cfg: EvalConfig, judge: Judge, is_reference: bool) -> PolicyEval:
    """Greedy and sampled answers of one policy, judged and scored."""
    greedy = generate_answers(model, tokenizer, prompt_ids, cfg, greedy=True)
    sampled = generate_answers(model, tokenizer, prompt_ids, cfg, greedy=False)
    greedy_judge = judge(prompts, greedy, 1)
    sample_judge = judge(prompts, sampled, cfg.num_samples)
    stats = sample_stats(sampled, sample_judge, model, reference, reward_model, cfg.temperature, is_reference)
    return PolicyEval(greedy.texts, greedy_judge, sampled.texts, stats)


# --- pure metrics ----------------------------------------------------------------------------

def win_rate(a_scores: Sequence[float] | torch.Tensor, b_scores: Sequence[float] | torch.Tensor) -> float:
    """Fraction of rows where a beats b, a tie counting 0.5: mean(1[a > b] + 0.5 * 1[a == b]).

    a_scores, b_scores: (M,) paired scores. A list against itself gives exactly 0.5."""
    a = torch.as_tensor(a_scores, dtype=torch.float64)
    b = torch.as_tensor(b_scores, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired scores, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float(win_rate_rows(a, b).mean())


def comparable_pairs(judge_scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(M, M) bool, True at (i, j) with i < j in the same group whose judge scores differ."""
    same_group = groups[:, None] == groups[None, :]
    differ = judge_scores[:, None] != judge_scores[None, :]
    return torch.triu(same_group & differ, diagonal=1)


def pairwise_agreement(rm_scores: Sequence[float] | torch.Tensor, judge_scores: Sequence[float] | torch.Tensor,
                       groups: Sequence[int] | torch.Tensor) -> float:
    """Over pairs of answers in the same group (same prompt) whose judge scores differ, the
    fraction the reward model orders the same way as the judge; a reward tie counts 0.5.

    rm_scores, judge_scores, groups: (M,). Pairs with equal judge scores are skipped; NaN if no
    pair is left."""
    rm = torch.as_tensor(rm_scores, dtype=torch.float64)
    judge = torch.as_tensor(judge_scores, dtype=torch.float64)
    pairs = comparable_pairs(judge, torch.as_tensor(groups))
    if not pairs.any():
        return float("nan")
    rm_diff = rm[:, None] - rm[None, :]            # (M, M)
    judge_diff = judge[:, None] - judge[None, :]   # (M, M)
    agree = torch.where(rm_diff == 0, 0.5, (torch.sign(rm_diff) == torch.sign(judge_diff)).double())
    return float(agree[pairs].mean())


@torch.no_grad()
def rm_accuracy(reward_model, dataset, pad_id: int, batch_size: int, device) -> float:
    """Fraction of preference rows (prompt_ids, chosen_ids, rejected_ids) whose chosen answer
    the reward model scores strictly higher."""
    wins = []
    for start in range(0, len(dataset), batch_size):
        chosen, rejected = pair_rewards(reward_model, collate_pairs(dataset[start:start + batch_size], pad_id), device)
        wins.append((chosen > rejected).float().cpu())
    return float(torch.cat(wins).mean())


@torch.no_grad()
def preference_accuracy(policy, reference, dataset, pad_id: int, batch_size: int, device,
                        reference_table: torch.Tensor | None = None) -> float:
    """Fraction of held-out preference rows where the policy's log-ratio to the reference is
    higher for the chosen answer than for the rejected one, a tie counting 0.5:
    mean(1[(pi_c - ref_c) > (pi_r - ref_r)] + 0.5 * 1[equal]). The reference itself scores 0.5.
    `reference_table` (`logprob_table` of the reference) spares scoring it again for every policy."""
    ref = logprob_table(reference, dataset, pad_id, batch_size, device) if reference_table is None else reference_table
    pi = ref if policy is reference else logprob_table(policy, dataset, pad_id, batch_size, device)
    ratio = pi - ref  # (N, 2): chosen, rejected
    return float(win_rate_rows(ratio[:, 0], ratio[:, 1]).mean())


def logprob_table(model, dataset, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """(N, 2) summed response log-probs, chosen then rejected, of every preference row under
    `model`, in chunks of `batch_size` rows (DPO's reference table, computed the same way)."""
    return precompute_reference(Frozen(model, device), dataset, pad_id, batch_size, device)


def win_rate_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row 1.0 if a > b, 0.5 if equal, else 0.0: (B,) float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return (a > b).double() + 0.5 * (a == b).double()


def clean(x: float) -> float:
    """A Python float rounded to 6 decimals (and -0.0 made 0.0), so JSON output is stable."""
    return round(float(x), 6) + 0.0


# --- report ----------------------------------------------------------------------------------

def policy_metrics(result: PolicyEval, reference: PolicyEval) -> dict[str, float]:
    """The per-policy numbers of the report; win rate pairs answers by (prompt, sample index)."""
    s = result.stats
    return {
        "judge_score": clean(s.judge.mean()),
        "judge_score_greedy": clean(result.greedy_judge.mean()),
        "win_rate_vs_sft": clean(win_rate(s.judge, reference.stats.judge)),
        "rm_score": clean(s.reward.mean()),
        "kl_to_sft": clean(s.kl.mean()),
        "mean_length": clean(s.length.mean()),
        "eos_rate": clean(s.eos.mean()),
    }


def policy_examples(result: PolicyEval, questions: list[str], num_samples: int) -> list[dict]:
    """The first `NUM_EXAMPLES` prompts with the greedy and the first sampled answer, judged."""
    return [{"prompt": questions[i],
             "greedy": result.greedy_texts[i], "greedy_score": clean(result.greedy_judge[i]),
             "sample": result.sample_texts[i * num_samples],
             "sample_score": clean(result.stats.judge[i * num_samples])}
            for i in range(min(NUM_EXAMPLES, len(questions)))]


def rm_metrics(results: dict[str, PolicyEval], num_samples: int, accuracy: float | None) -> dict[str, float]:
    """Reward-model accuracy on preference pairs (if given) and its agreement with the judge on
    all sampled answers, pooled over policies and grouped by prompt."""
    stats = [r.stats for r in results.values()]
    n_answers = len(stats[0].judge)
    groups = torch.arange(n_answers).div(num_samples, rounding_mode="floor").repeat(len(stats))
    judge = torch.cat([s.judge for s in stats])
    reward = torch.cat([s.reward.double() for s in stats])
    out = {} if accuracy is None else {"accuracy": clean(accuracy)}
    out["judge_agreement"] = clean(pairwise_agreement(reward, judge, groups))
    out["judge_agreement_pairs"] = float(comparable_pairs(judge, groups).sum())
    return out


def _check_names(policies: dict[str, Path], reference: str, prompts: Sequence[Prompt]) -> None:
    if reference not in policies:
        raise ValueError(f"reference {reference!r} is not among the policies ({', '.join(policies)})")
    clash = [n for n in policies if n in RESERVED_NAMES]
    if clash:
        raise ValueError(f"policy name {clash[0]!r} is reserved (reserved: {', '.join(RESERVED_NAMES)})")
    if not prompts:
        raise ValueError("no prompts to evaluate")


def load_judge(ref: str | Path, policy_tokenizer, model_cfg: ModelConfig, device=None, name: str | None = None) -> Judge:
    """A reward-model judge from a directory: it scores the sampled token ids when it shares the
    policies' vocabulary, and re-renders the answers with its own chat template otherwise. `name`
    (default: the directory) is what the report calls it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(ref, model_cfg.trust_remote_code)
    model = freeze(load_scalar_model(ref, model_cfg, tokenizer.pad_token_id), device)
    if tokenizer.get_vocab() == policy_tokenizer.get_vocab():
        return RolloutRMJudge(name or str(ref), model)
    return TextRMJudge(name or str(ref), model, tokenizer)


def evaluate_policies(policies: dict[str, Path], reference: str, reward_dir: Path, prompts: list[Prompt],
                      cfg: EvalConfig, model_cfg: ModelConfig, judge: Judge, preference_eval=None, *,
                      max_prompt_length: int = 64, device=None) -> dict:
    """Evaluate each saved policy against `policies[reference]`.

    Returns {"judge": judge.name, "rm": {"accuracy"?, "judge_agreement", "judge_agreement_pairs"},
    "<policy>": {"judge_score", "judge_score_greedy", "win_rate_vs_sft", "rm_score", "kl_to_sft",
    "mean_length", "eos_rate", "preference_accuracy"?} for each policy in the given order,
    "examples": {"<policy>": [...]}}. `accuracy` and `preference_accuracy` need `preference_eval`
    (tokenised held-out preference rows). All numbers are floats rounded to 6 decimals;
    `judge_agreement` is NaN when no two answers to one prompt differ in judge score.
    """
    _check_names(policies, reference, prompts)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(policies[reference], model_cfg.trust_remote_code)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length)
    questions = [prompt_text(p) for p in prompts]
    ref_model = freeze(load_policy(policies[reference], model_cfg), device)
    reward_model = freeze(load_scalar_model(reward_dir, model_cfg, tokenizer.pad_token_id), device)
    pairs = preference_eval if preference_eval is not None and len(preference_eval) > 0 else None

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        results, pref_acc, accuracy = _evaluate_all(policies, reference, ref_model, reward_model, tokenizer, prompt_ids,
                                                    prompts, cfg, model_cfg, judge, pairs, device)
    report: dict = {"judge": judge.name, "rm": rm_metrics(results, cfg.num_samples, accuracy)}
    for name, result in results.items():
        report[name] = policy_metrics(result, results[reference])
        if name in pref_acc:
            report[name]["preference_accuracy"] = clean(pref_acc[name])
    report["examples"] = {name: policy_examples(r, questions, cfg.num_samples) for name, r in results.items()}
    return report


def _evaluate_all(policies, reference, ref_model, reward_model, tokenizer, prompt_ids, prompts, cfg, model_cfg,
                  judge, pairs, device) -> tuple[dict[str, PolicyEval], dict[str, float], float | None]:
    """Each policy's answers and scores, its held-out preference accuracy, and the RM's accuracy."""
    batch_size = max(1, cfg.batch_size)
    results: dict[str, PolicyEval] = {}
    pref_acc: dict[str, float] = {}
    # the reference's held-out pair log-probs are the same for every policy: scored once
    ref_table = None if pairs is None else logprob_table(ref_model, pairs, tokenizer.pad_token_id, batch_size, device)
    for name, path in policies.items():
        model = ref_model if name == reference else freeze(load_policy(path, model_cfg), device)
        results[name] = evaluate_policy(model, ref_model, reward_model, tokenizer, prompt_ids, prompts,
                                        cfg, judge, is_reference=name == reference)
        if pairs is not None:
            pref_acc[name] = preference_accuracy(model, ref_model, pairs, tokenizer.pad_token_id, batch_size, device,
                                                 ref_table)
        del model

    accuracy = None if pairs is None else rm_accuracy(reward_model, pairs, tokenizer.pad_token_id, batch_size, device)
    return results, pref_acc, accuracy
