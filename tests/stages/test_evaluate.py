"""``rlhf-ray eval`` on saved tiny models: the report files and their figures, a policy compared
with itself (KL 0, every prompt a tie), and the figures recomputed by hand from the samples."""

from __future__ import annotations

import json
import math
from statistics import mean

import pytest
import yaml

from rlhf_ray.cli import main
from rlhf_ray.config.ppo import ModelSpec
from rlhf_ray.config.stages import EvalConfig, load_eval_config
from rlhf_ray.data.tokenization import TiktokenTokenizer
from rlhf_ray.models import build_scalar_model
from rlhf_ray.stages.evaluate import run_eval
from rlhf_ray.workers.evaluation import InProcessEvalWorkers
from tests.helpers.model_dirs import save_policy

KEYS = ("policy/reward_mean", "baseline/reward_mean", "win_rate", "kl_to_baseline",
        "policy/response_length", "baseline/response_length", "num_prompts")  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    tok = TiktokenTokenizer.byte_level()
    rm = root / "rm"
    build_scalar_model(ModelSpec(init_seed=3), tok).save_pretrained(str(rm))
    tok.save(rm)
    return {"policy": save_policy(root / "policy", tok, 1),
            "baseline": save_policy(root / "baseline", tok, 2), "rm": rm}  # fmt: skip


def test_eval_writes_the_report(models, tmp_path, capsys):
    run_dir = tmp_path / "eval"
    code = main(["eval", "--in-process", "--run-dir", str(run_dir),
                 "--policy", str(models["policy"]), "--baseline", str(models["baseline"]),
                 "--reward-model", str(models["rm"]), "eval.num_prompts=12",
                 "rollout.batch_size=5", "rollout.max_new_tokens=8"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "eval step   2" in out and "win rate" in out
    report = json.loads((run_dir / "eval.json").read_text())
    assert all(k in report for k in KEYS) and report["num_prompts"] == 12
    assert report["reward"] == str(models["rm"]) and report["win_rate_ties"] == "count half"
    assert report["policy/response_length"] <= 8

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt_index"] for s in samples] == list(range(12))
    wins = [(s["policy/score"] > s["baseline/score"]) + 0.5 * (s["policy/score"] == s["baseline/score"])
            for s in samples]  # fmt: skip
    assert report["win_rate"] == pytest.approx(mean(wins))
    assert report["policy/reward_mean"] == pytest.approx(mean(s["policy/score"] for s in samples))
    assert report["kl_to_baseline"] == pytest.approx(mean(s["kl_to_baseline"] for s in samples))
    assert report["kl_to_baseline"] > 0  # two different random models
    # n and a 95% win-rate interval as wide as the binomial figure for n = 12 (Wilson:
    # 2 z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)); 0.5 inside it at n = 12: a warning
    p, n, z = report["win_rate"], report["n"], 1.959964
    width = 2 * z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert n == 12
    assert report["win_rate_ci_high"] - report["win_rate_ci_low"] == pytest.approx(width, abs=1e-6)
    assert report["win_rate_ci_low"] <= p <= report["win_rate_ci_high"]
    margins = [s["policy/score"] - s["baseline/score"] for s in samples]
    assert report["reward_margin_ci_low"] < mean(margins) < report["reward_margin_ci_high"]
    assert "cannot tell the policy from the baseline" in report["warning"]
    assert "warning: n=12 prompts" in out

    md = (run_dir / "eval.md").read_text()
    assert "| reward_mean |" in md and f"**{report['win_rate']:.4f}**" in md
    assert f"[{report['win_rate_ci_low']:.4f}, {report['win_rate_ci_high']:.4f}] over n = 12" in md
    assert "**warning**" in md
    assert "| # | prompt | policy response | policy score |" in md
    assert md.count("\n| ") >= 4 + 8  # the figure rows and the 8 sample rows (eval.table_rows)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2] and all("time/generate" in s for s in steps)
    assert EvalConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))


def test_a_policy_against_itself_ties_everywhere_with_zero_kl(models, tmp_path):
    cfg = load_eval_config(None, [f"policy.path={models['policy']}",
                                  f"baseline.path={models['policy']}",
                                  f"reward.model.path={models['rm']}", "eval.num_prompts=6",
                                  "rollout.max_new_tokens=8", "logging.progress=false"])  # fmt: skip
    report = run_eval(cfg, InProcessEvalWorkers(cfg), tmp_path)
    assert report["kl_to_baseline"] == 0.0
    assert report["win_rate"] == 0.5 and report["tie_rate"] == 1.0
    assert report["policy/reward_mean"] == report["baseline/reward_mean"]


def test_baseline_with_another_tokenizer_is_refused(models, tmp_path):
    from tests.helpers.model_dirs import bpe_tokenizer

    other = save_policy(tmp_path / "bpe_policy", bpe_tokenizer(tmp_path / "bpe"))
    code = main(["eval", "--in-process", "--policy", str(models["policy"]),
                 "--baseline", str(other)])  # fmt: skip
    assert code == 2


def test_eval_leaves_out_the_prompts_the_policys_ppo_run_trained_on(tmp_path):
    """A policy saved in a PPO run (RUN/policy beside RUN/config.yaml): eval drops every prompt
    of that run's data.prompts, and refuses when none is left."""
    from rlhf_ray.config.ppo import load_config, to_yaml
    from rlhf_ray.stages.evaluate import eval_prompts

    rows = [{"prompt": f"question {i}"} for i in range(10)]
    trained, mixed = tmp_path / "trained.jsonl", tmp_path / "mixed.jsonl"
    trained.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    run = tmp_path / "ppo_run"
    (run / "policy").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(None, [f"data.prompts={trained}"])))
    tok = TiktokenTokenizer.byte_level()
    base = [f"policy.path={run / 'policy'}", "eval.num_prompts=null"]
    cfg = load_eval_config(None, [*base, f"data.prompts={mixed}"])
    prompts, dropped = eval_prompts(cfg, tok)
    assert dropped == 3 and prompts == [f"question {i}" for i in range(6, 10)]
    cfg = load_eval_config(
        None, [*base, f"data.prompts={mixed}", "eval.exclude_trained_prompts=false"]
    )
    assert eval_prompts(cfg, tok) == ([f"question {i}" for i in range(3, 10)], 0)
    with pytest.raises(ValueError, match="trained on: give held-out prompts"):
        eval_prompts(load_eval_config(None, [*base, f"data.prompts={trained}"]), tok)


def test_eval_rewards_get_the_prompt_columns(models, tmp_path):
    from tests.helpers.reward_fns import labelled_prompts

    prompts = labelled_prompts(tmp_path / "prompts.jsonl", 6)
    cfg = load_eval_config(
        None,
        [
            f"policy.path={models['policy']}",
            f"baseline.path={models['policy']}",
            "reward.function=tests.helpers.reward_fns:label_term",
            f"data.prompts={prompts}",
            "eval.num_prompts=6",
            "rollout.max_new_tokens=8",
            "logging.progress=false",
        ],
    )
    report = run_eval(cfg, InProcessEvalWorkers(cfg), tmp_path / "run")  # label_term checks
    assert report["num_prompts"] == 6 and 0 <= report["policy/reward_mean"] <= 1


def test_eval_after_arithmetic_training_uses_the_heldout_split(tmp_path, capsys):
    """The policy's PPO run trained on builtin:arithmetic: with data.prompts unset, eval reads
    builtin:arithmetic-heldout, rendered as that run rendered its prompts; a data.prompts given
    is kept."""
    from rlhf_ray.config.ppo import load_config, to_yaml
    from rlhf_ray.stages.evaluate import eval_prompts, with_heldout_prompts

    run = tmp_path / "ppo_run"
    (run / "policy").mkdir(parents=True)
    ppo = load_config(None, ["data.prompts=builtin:arithmetic", "data.max_prompt_tokens=80"])
    (run / "config.yaml").write_text(to_yaml(ppo))
    base = [f"policy.path={run / 'policy'}", "eval.num_prompts=null"]
    cfg = with_heldout_prompts(load_eval_config(None, [*base, "data.on_bad_row=skip"]))
    assert cfg.data.prompts == "builtin:arithmetic-heldout"
    assert cfg.data.max_prompt_tokens == 80 and cfg.data.on_bad_row == "skip"
    assert "held-out split" in capsys.readouterr().out
    assert with_heldout_prompts(cfg) is cfg
    prompts, dropped = eval_prompts(cfg, TiktokenTokenizer.byte_level())
    assert len(prompts) == 221 and dropped == 0
    assert prompts.columns[0]["label"] == int(prompts[0].split()[2]) + int(
        prompts[0].split()[4][:-1]
    )
    given = load_eval_config(None, [*base, "data.prompts=builtin"])
    assert with_heldout_prompts(given) is given
    off = load_eval_config(None, [*base, "eval.exclude_trained_prompts=false"])
    assert with_heldout_prompts(off) is off


def _rows(policy: list[tuple[float, int]], baseline: list[tuple[float, int]]) -> list[dict]:
    """``compare`` rows from (score, length) pairs of both models."""
    rows = []
    for i, ((ps, pl), (bs, bl)) in enumerate(zip(policy, baseline, strict=True)):
        rows.append({"prompt_index": i, "prompt": "p", "kl_to_baseline": 0.0,
                     "policy/response": "x" * pl, "policy/score": ps, "policy/length": pl,
                     "policy/eos": True, "baseline/response": "x" * bl, "baseline/score": bs,
                     "baseline/length": bl, "baseline/eos": True})  # fmt: skip
    return rows


def test_a_win_with_longer_responses_is_flagged_as_possible_length_bias(tmp_path, capsys):
    from rlhf_ray.stages.evaluate import print_summary, write_report

    # the policy wins 3 prompts and ties 1 (win rate 0.875); its mean length 12 against the baseline's 8: +50%
    longer = _rows([(1.0, 12), (1.0, 14), (1.0, 10), (0.0, 12)], [(0.0, 8)] * 4)
    cfg = load_eval_config(None, [])  # eval.max_length_gain 0.2 by default
    summary = write_report(cfg, longer, tmp_path, 0)
    assert summary["length_gain"] == pytest.approx(0.5)
    assert "responses +50% longer" in summary["length_warning"]
    assert "eval.max_length_gain 0.2" in summary["length_warning"]
    assert json.loads((tmp_path / "eval.json").read_text())["length_warning"]
    md = (tmp_path / "eval.md").read_text()
    assert "length_gain (policy / baseline mean length - 1): +0.5000" in md
    assert "length bias" in md
    print_summary(summary, 4)
    assert "warning: the policy wins (win rate 0.875)" in capsys.readouterr().out
    # a gain under the threshold, a loss, or the warning off: none
    for overrides, rows in (
        (["eval.max_length_gain=0.6"], longer),
        (["eval.max_length_gain=null"], longer),
        ([], _rows([(0.0, 12)] * 4, [(1.0, 8)] * 4)),  # longer, but the policy loses
        ([], _rows([(1.0, 9)] * 4, [(0.0, 8)] * 4)),  # wins, 12.5% longer
    ):
        summary = write_report(load_eval_config(None, overrides), rows, tmp_path, 0)
        assert summary["length_warning"] is None, overrides
