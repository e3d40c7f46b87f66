"""`rlhf compare`'s table: differing params first, then headline metrics, best and winner marked."""
from tasks.compare import RunView, best_index, differing_params, direction, render, winner

A = RunView("first run", "a" * 32, {"dpo.beta": "0.1", "sft.max_steps": "4", "pt.max_steps": "4"},
            {"eval/dpo/judge_score": 0.5, "eval/ppo/judge_score": 0.625, "eval/dpo/kl_to_sft": 2.0,
             "sft/final_train_loss": 3.0, "time/sft_seconds": 1.0, "rm/heldout_accuracy": 0.75})
B = RunView("dpo.beta=0.3", "b" * 32, {"dpo.beta": "0.3", "sft.max_steps": "4", "pt.max_steps": "4"},
            {"eval/dpo/judge_score": 0.75, "eval/ppo/judge_score": 0.625, "eval/dpo/kl_to_sft": 1.0,
             "sft/final_train_loss": 3.0, "time/sft_seconds": 1.0, "rm/heldout_accuracy": 0.75},
            reused=("sft", "ppo"))


def test_only_params_that_differ_are_listed():
    assert differing_params([A, B]) == ["dpo.beta"]
    c = RunView("c", "c" * 32, {"dpo.beta": "0.1"})
    assert differing_params([A, c]) == ["pt.max_steps", "sft.max_steps"]  # missing counts as different
    assert differing_params([A]) == []


def test_directions_and_best_values():
    assert direction("eval/ppo/judge_score") == 1 and direction("rm/heldout_accuracy") == 1
    assert direction("sft/final_eval_loss") == -1
    assert direction("eval/dpo/kl_to_sft") == 0 and direction("time/pt_seconds") == 0
    assert best_index([0.5, 0.75, None], 1) == 1 and best_index([0.5, 0.75], -1) == 0
    assert best_index([0.5, 0.5], 1) is None and best_index([0.5, None], 1) is None and best_index([1.0, 2.0], 0) is None


def test_the_winner_has_the_best_aligned_policy():
    # A's best aligned policy scores 0.625 (PPO), B's 0.75 (DPO)
    assert winner([A, B]) == 1 and winner([B, A]) == 0
    assert winner([A]) == 0 and winner([RunView("x", "x")]) is None
    assert winner([A, RunView("x", "x", metrics={"eval/ppo/judge_score": 0.625})]) is None  # a tie


def test_equal_judge_scores_are_decided_by_win_rate_then_by_the_smaller_kl():
    def run(name, rate, kl):
        return RunView(name, name * 32, metrics={"eval/dpo/judge_score": 0.5, "eval/dpo/win_rate_vs_sft": rate,
                                                 "eval/dpo/kl_to_sft": kl})

    assert winner([run("a", 0.5, 1.0), run("b", 0.625, 2.0)]) == 1
    assert winner([run("a", 0.5, 1.0), run("b", 0.5, 2.0)]) == 0
    assert winner([run("a", 0.5, 1.0), run("b", 0.5, 1.0)]) is None
    tie = render([run("a", 0.5, 1.0), run("b", 0.5, 1.0)]).splitlines()
    assert tie[-1] == "winner: none, the best aligned policies tie on judge score, win rate vs SFT and KL to SFT"
    assert "[winner]" not in tie[0]
    assert render([RunView("a", "a" * 32)]).splitlines()[-1] == "winner: none, no run has an evaluation"


def test_render_puts_the_differing_param_first_and_marks_the_best_and_the_winner():
    out = render([A, B])
    lines = out.splitlines()
    assert lines[0].split() == ["first", "run", "(aaaaaaaa)", "dpo.beta=0.3", "(bbbbbbbb)", "[winner]"]
    assert lines[1].startswith("params that differ")
    assert lines[2].split() == ["dpo.beta", "0.1", "0.3"]
    assert lines[3].startswith("metrics")
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[4:]}
    assert list(rows)[:3] == ["eval/dpo/judge_score", "eval/dpo/kl_to_sft", "eval/ppo/judge_score"]
    assert rows["eval/dpo/judge_score"] == ["0.5", "0.75", "*"]
    assert rows["eval/dpo/kl_to_sft"] == ["2", "1"]  # no better direction: unmarked
    assert rows["eval/ppo/judge_score"] == ["0.625", "0.625"]  # equal: unmarked
    assert rows["sft/final_train_loss"] == ["3", "3"]
    assert list(rows)[-3:] == ["time/sft_seconds", "reused", "winner:"]
    assert rows["reused"] == ["stages", "-", "sft,ppo"]
    assert lines[-1] == (f"winner: dpo.beta=0.3 ({'b' * 32}): its dpo has judge score 0.75, win rate vs SFT 0, "
                         "KL to SFT 1")
    assert render([]) == "no pipeline runs found\n"
