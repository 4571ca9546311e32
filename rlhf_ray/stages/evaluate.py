"""``rlhf-ray eval``: a tuned policy against its baseline, judged by the reward.

``run_eval`` reads top to bottom: for each batch of held-out prompts, (1) both policies sample a
response to every prompt, with the same seed per prompt, (2) the reward scores every response
and both models score the POLICY's responses (log-probs), (3) the per-prompt comparison is
logged; then (4) the summary goes to ``eval.json`` and ``eval.md``, every sample to
``samples.jsonl``. Definitions:

- ``policy/reward_mean``, ``baseline/reward_mean``: mean raw score (no normalisation, clipping or
  missing-EOS penalty) of each model's responses;
- ``win_rate``: fraction of prompts where the policy's score is above the baseline's on the same
  prompt, a tie counting half (``algo.win_rate``); ``tie_rate`` is the fraction of ties;
- ``kl_to_baseline``: mean over the policy's samples of the summed per-token KL estimate
  ``eval.kl_estimator`` (k1: log pi - log pi_baseline) at the sampling temperature: an estimate
  of KL(policy || baseline) per response, in nats; 0 when policy == baseline;
- ``*/response_length``: mean response tokens (up to and including EOS); ``length_gain``:
  the policy's over the baseline's, minus 1. A policy that wins (win rate above 0.5) with a
  ``length_gain`` above ``eval.max_length_gain`` gets ``length_warning`` (length bias);
- ``*/reward_ci_low`` / ``_high``: the 95% interval of each model's mean reward (Wilson's when
  every score is 0 or 1, an accuracy; else the t interval), ``algo.mean_interval``;
- ``n``: the number of paired prompts; ``win_rate_ci_low`` / ``_high``: the 95% Wilson
  interval of the win rate, ``reward_margin_ci_low`` / ``_high``: the paired 95% t interval
  of the mean reward difference (``algo.comparison``). When the win-rate interval holds 0.5,
  eval.md, eval.json (``warning``) and the console say so, with about how many prompts the
  measured win rate would need.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.algo import (
    mean_difference_interval,
    mean_interval,
    prompts_to_exclude_half,
    sequence_kl,
    win_rate,
    win_rate_interval,
)
from rlhf_ray.config.ppo import Config, ConfigError, load_config, to_yaml
from rlhf_ray.config.stages import EvalConfig, eval_tokenizer
from rlhf_ray.data.chat_format import render_transcript
from rlhf_ray.data.prompts import load_prompt_conversations, load_prompt_set
from rlhf_ray.data.sources import HELDOUT_SPLITS
from rlhf_ray.data.tokenization import Tokenizer, build_tokenizer, chat_template_start
from rlhf_ray.observe.metrics import MetricsLog, PhaseTimer
from rlhf_ray.ppo.batches import PromptTexts, check_rollout, tokenize_prompts
from rlhf_ray.workers.evaluation import LOADED, MODELS, EvalWorkers

# --------------------------------------------------------------------------------------------
# setup helpers


def trained_run(policy_path: str | None) -> tuple[Config | None, Path | None]:
    """The config of the PPO run ``policy_path`` comes from: the first ``config.yaml`` of a
    PPO run in its directory or up to two levels above (RUN/policy,
    RUN/checkpoints/round_N/policy), and that file; None and None when there is none."""
    if not policy_path:
        return None, None
    for directory in list(Path(policy_path).resolve().parents)[:3]:
        path = directory / "config.yaml"
        if not path.is_file():
            continue
        try:
            return load_config(path), path
        except ConfigError:
            continue  # another stage's config (sft, train-rm): not a PPO run
    return None, None


def trained_conversations(policy_path: str | None) -> tuple[set[str], Path | None]:
    """The prompts (conversations, as JSON) of the PPO run ``policy_path`` comes from
    (``trained_run``), and its config file; empty and None when there is none."""
    ppo, path = trained_run(policy_path)
    if ppo is None:
        return set(), None
    d = ppo.data
    conversations = load_prompt_conversations(d.prompts, d.prompt_field, d.split, d.format)
    return {json.dumps(c, sort_keys=True) for c in conversations}, path


def with_heldout_prompts(cfg: EvalConfig) -> EvalConfig:
    """``cfg``, or, when ``data.prompts`` is unset and the policy's PPO run trained on a
    built-in set with a held-out split (``builtin:arithmetic``), ``cfg`` with that run's data
    section on the held-out split (``builtin:arithmetic-heldout``): the prompts rendered as
    PPO rendered them (chat template, length), the data settings given to eval kept."""
    if "prompts" in cfg.data.model_fields_set or not cfg.eval.exclude_trained_prompts:
        return cfg
    ppo, path = trained_run(cfg.policy.path)
    if ppo is None or ppo.data.prompts not in HELDOUT_SPLITS:
        return cfg
    given = {name: getattr(cfg.data, name) for name in cfg.data.model_fields_set}
    heldout = HELDOUT_SPLITS[ppo.data.prompts]
    print(
        f"[rlhf_ray] eval: prompts from {heldout}, the held-out split of the policy's PPO "
        f"prompts {ppo.data.prompts} ({path}), since data.prompts is not set",
        flush=True,
    )
    data = ppo.data.model_copy(update={**given, "prompts": heldout})
    return cfg.model_copy(update={"data": data})


def eval_prompts(cfg: EvalConfig, tokenizer: Tokenizer) -> tuple[PromptTexts, int]:
    """The first ``eval.num_prompts`` prompt texts (chat template applied if configured) that
    the policy's PPO run did not train on (``eval.exclude_trained_prompts``), and how many
    were dropped for that. The texts carry their rows' ``columns`` for the reward."""
    data = cfg.data
    loaded = load_prompt_set(data.prompts, data.prompt_field, data.split, data.format)
    conversations, columns = loaded.conversations, loaded.columns
    dropped = 0
    if cfg.eval.exclude_trained_prompts:
        trained, source = trained_conversations(cfg.policy.path)
        keep = [json.dumps(c, sort_keys=True) not in trained for c in conversations]
        kept = [c for c, k in zip(conversations, keep, strict=True) if k]
        columns = [c for c, k in zip(columns, keep, strict=True) if k] if columns else columns
        dropped = len(conversations) - len(kept)
        if not kept:  # a ConfigError: the CLI prints it as one line
            raise ConfigError(
                f"every prompt of data.prompts={data.prompts!r} is one the policy's PPO run "
                f"({source}) trained on: give held-out prompts (data.prompts=FILE, e.g. a split "
                f"kept out of PPO's data) or set eval.exclude_trained_prompts=false"
            )
        conversations = kept
    if data.chat_template:
        prompts = [tokenizer.apply_chat(conv) for conv in conversations]
    elif loaded.format == "plain":  # as PPO renders them (driver.build_prompts)
        prompts = [conv[0]["content"] for conv in conversations]
    else:
        prompts = [render_transcript(conv, add_generation_prompt=True) for conv in conversations]
    texts = PromptTexts(prompts[: cfg.eval.num_prompts])
    texts.columns = columns[: cfg.eval.num_prompts]
    return texts, dropped


def compare(
    samples: dict[str, Any], scored: dict[str, torch.Tensor], estimator: str
) -> list[dict[str, Any]]:
    """One row per prompt: both responses, both scores, the policy sample's KL to the baseline."""
    mine = samples["policy"]
    kl = sequence_kl(
        scored["policy/logprobs"], scored["baseline/logprobs"], mine.response_mask, estimator
    )
    rows = []
    for i in range(len(mine)):
        row: dict[str, Any] = {"prompt_index": int(mine.prompt_index[i]), "prompt": mine.prompts[i]}
        for m in MODELS:
            row[f"{m}/response"] = samples[m].responses[i]
            row[f"{m}/score"] = float(scored[f"{m}/scores"][i])
            row[f"{m}/length"] = int(samples[m].response_mask[i].sum())
            row[f"{m}/eos"] = bool(samples[m].has_eos[i])
        row["kl_to_baseline"] = float(kl[i])
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The headline figures of a list of ``compare`` rows (see the module docstring)."""
    out: dict[str, float] = {"num_prompts": len(rows)}
    scores = {m: torch.tensor([r[f"{m}/score"] for r in rows]) for m in MODELS}
    for m in MODELS:
        out[f"{m}/reward_mean"] = float(scores[m].mean())
        out[f"{m}/reward_std"] = float(scores[m].std()) if len(rows) > 1 else 0.0
        out[f"{m}/response_length"] = sum(r[f"{m}/length"] for r in rows) / len(rows)
        out[f"{m}/eos_rate"] = sum(r[f"{m}/eos"] for r in rows) / len(rows)
        out[f"{m}/reward_ci_low"], out[f"{m}/reward_ci_high"] = mean_interval(scores[m])
    base_length = out["baseline/response_length"]
    out["length_gain"] = out["policy/response_length"] / base_length - 1 if base_length else 0.0
    out["win_rate"] = win_rate(scores["policy"], scores["baseline"])
    out["tie_rate"] = float((scores["policy"] == scores["baseline"]).float().mean())
    out["reward_margin"] = float((scores["policy"] - scores["baseline"]).mean())
    out["kl_to_baseline"] = sum(r["kl_to_baseline"] for r in rows) / len(rows)
    out["n"] = len(rows)
    out["win_rate_ci_low"], out["win_rate_ci_high"] = win_rate_interval(out["win_rate"], len(rows))
    margin_ci = mean_difference_interval(scores["policy"] - scores["baseline"])
    out["reward_margin_ci_low"], out["reward_margin_ci_high"] = margin_ci
    return out


def interval_warning(summary: dict[str, Any]) -> str | None:
    """A sentence when the win-rate interval holds 0.5 (policy and baseline not told apart)."""
    low, high, n = summary["win_rate_ci_low"], summary["win_rate_ci_high"], summary["n"]
    if not low <= 0.5 <= high:
        return None
    needed = prompts_to_exclude_half(summary["win_rate"])
    if needed is None:
        more = "no difference was measured"
    else:
        more = (
            f"a win rate of {summary['win_rate']:.3f} needs about {needed} prompts to exclude 0.5"
        )
    return (
        f"n={n} prompts: the 95% win-rate interval [{low:.3f}, {high:.3f}] holds 0.5, so this "
        f"eval cannot tell the policy from the baseline; {more} (eval.num_prompts)"
    )


def length_warning(summary: dict[str, Any], max_gain: float | None) -> str | None:
    """A sentence when the policy wins with responses more than ``max_gain`` longer than the
    baseline's (``eval.max_length_gain``): a reward that prefers length wins so too."""
    gain = summary["length_gain"]
    if max_gain is None or summary["win_rate"] <= 0.5 or gain <= max_gain:
        return None
    return (
        f"the policy wins (win rate {summary['win_rate']:.3f}) with responses {gain:+.0%} longer "
        f"than the baseline's ({summary['policy/response_length']:.1f} vs "
        f"{summary['baseline/response_length']:.1f} tokens; eval.max_length_gain "
        f"{max_gain:g}): the reward may prefer length (length bias); compare responses of like "
        "length, or train with a length term (rlhf_ray.rewards:length_penalty)"
    )


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")
    return text if len(text) <= limit else "…" + text[-limit:]


def eval_markdown(summary: dict[str, Any], rows: list[dict[str, Any]], table_rows: int) -> str:
    """``eval.md``: the figures, then a sample table (prompt, both responses, both scores)."""
    lines = [
        "# Evaluation: policy vs baseline",
        "",
        f"- policy: `{summary['policy']}`",
        f"- baseline: `{summary['baseline']}`",
        f"- reward: `{summary['reward']}`",
        f"- prompts: {summary['num_prompts']} (`{summary['prompts']}`)",
        "",
        "| figure | policy | baseline |",
        "|---|---|---|",
    ]
    for name in ("reward_mean", "reward_std", "response_length", "eos_rate"):
        lines.append(
            f"| {name} | {summary[f'policy/{name}']:.4f} | {summary[f'baseline/{name}']:.4f} |"
        )
    lines.append(
        "| reward_mean 95% interval | "
        + " | ".join(
            f"[{summary[f'{m}/reward_ci_low']:.4f}, {summary[f'{m}/reward_ci_high']:.4f}]"
            for m in MODELS
        )
        + " |"
    )
    lines += [
        "",
        f"- win_rate: **{summary['win_rate']:.4f}** (policy score above the baseline's on the "
        f"same prompt; ties count half; tie_rate {summary['tie_rate']:.4f}); 95% interval "
        f"[{summary['win_rate_ci_low']:.4f}, {summary['win_rate_ci_high']:.4f}] over "
        f"n = {summary['n']} prompts (Wilson)",
        f"- reward_margin (policy - baseline, mean): {summary['reward_margin']:+.4f}; paired 95% "
        f"interval [{summary['reward_margin_ci_low']:+.4f}, {summary['reward_margin_ci_high']:+.4f}]",
        *([f"- **warning**: {summary['warning']}"] if summary.get("warning") else []),
        f"- length_gain (policy / baseline mean length - 1): {summary['length_gain']:+.4f}",
        *([f"- **warning**: {summary['length_warning']}"] if summary.get("length_warning") else []),
        f"- kl_to_baseline: {summary['kl_to_baseline']:.4f} nats per response "
        f"({summary['kl_estimator']} estimate on the policy's samples)",
        "",
        f"## Samples (first {min(table_rows, len(rows))})",
        "",
        "| # | prompt | policy response | policy score | baseline response | baseline score |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[:table_rows]:
        lines.append(
            f"| {r['prompt_index']} | {_cell(r['prompt'])} | {_cell(r['policy/response'])} | "
            f"{r['policy/score']:+.4f} | {_cell(r['baseline/response'])} | "
            f"{r['baseline/score']:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def format_eval_progress(row: dict[str, Any]) -> str:
    return (
        f"eval step {row['step']:>3} | prompts {row['num_prompts']:>4} "
        f"| policy {row['policy/reward_mean']:+.4f} | baseline {row['baseline/reward_mean']:+.4f} "
        f"| win {row['win_rate']:.3f} | kl {row['kl_to_baseline']:+.4f} | {row['time/step']:.1f}s"
    )


def _source(spec: Any) -> str:
    return spec.path or f"{spec.preset} preset (init_seed {spec.init_seed})"


def reward_source(reward: Any) -> str:
    """The reward model, or an ensemble's members and how they combine."""
    if not isinstance(reward.model, list):
        return _source(reward.model) if reward.model is not None else str(reward.remote.url)
    members = ", ".join(_source(m) for m in reward.model)
    return f"ensemble ({reward.ensemble.combine}) of {members}"


# --------------------------------------------------------------------------------------------
# the stage


def start_eval(cfg: EvalConfig, run_dir: Path) -> tuple[Tokenizer, PromptTexts, int, MetricsLog]:
    """Create ``run_dir`` with ``config.yaml``; the tokenizer, the prompts (and how many
    were left out as the policy's PPO prompts) and the open ``metrics.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tokenizer = build_tokenizer(eval_tokenizer(cfg))
    prompts, dropped = eval_prompts(cfg, tokenizer)
    if dropped:
        print(
            f"[rlhf_ray] eval: {dropped} prompts the policy's PPO run trained on left out "
            f"(eval.exclude_trained_prompts)",
            flush=True,
        )
    log = MetricsLog(
        run_dir / "metrics.jsonl",
        cfg.logging.progress,
        tensorboard_dir=run_dir / "tb" if cfg.logging.tensorboard else None,
        format_row=format_eval_progress,
        step_key="step",
    )
    return tokenizer, prompts, dropped, log


def print_summary(summary: dict[str, Any], num_prompts: int) -> None:
    """The closing console lines: a warning if any, then the headline figures."""
    for key in ("warning", "length_warning"):
        if summary.get(key):
            print(f"[rlhf_ray] warning: {summary[key]}", flush=True)
    print(
        f"eval: policy reward {summary['policy/reward_mean']:+.4f} vs baseline "
        f"{summary['baseline/reward_mean']:+.4f}, win rate {summary['win_rate']:.3f} "
        f"[{summary['win_rate_ci_low']:.3f}, {summary['win_rate_ci_high']:.3f}], "
        f"kl {summary['kl_to_baseline']:.4f} over {num_prompts} prompts",
        flush=True,
    )


def run_eval(cfg: EvalConfig, workers: EvalWorkers, run_dir: Path) -> dict[str, Any]:
    """Generate -> score -> compare over the held-out prompts, then write the report.
    Returns the summary (what ``eval.json`` holds)."""
    cfg = with_heldout_prompts(cfg)  # (a no-op when the CLI has done it)
    tokenizer, prompts, dropped, log = start_eval(cfg, run_dir)
    timer = PhaseTimer()
    rows: list[dict[str, Any]] = []
    size = cfg.rollout.batch_size

    for step, start in enumerate(range(0, len(prompts), size)):
        started = time.perf_counter()
        index = list(range(start, min(start + size, len(prompts))))

        # 1. generate: both policies sample every prompt, with the same seed per prompt
        with timer.phase("generate"):
            batch, _ = tokenize_prompts(
                tokenizer,
                prompts,
                index,
                cfg.data.max_prompt_tokens,
                chat_template_start(tokenizer),
            )
            samples = workers.generate(batch, step)
            for rollout in samples.values():
                check_rollout(rollout, LOADED, index)

        # 2. score: rewards of both; log-probs of the policy's samples under both models
        with timer.phase("score"):
            scored = workers.score(samples)

        # 3. compare: per-prompt rows, the step's figures logged
        step_rows = compare(samples, scored, cfg.eval.kl_estimator)
        rows += step_rows
        log.write(
            {
                "step": step,
                **summarize(step_rows),
                **timer.pop(),
                "time/step": time.perf_counter() - started,
            }
        )

    # 4. report: eval.json (figures), eval.md (figures + sample table), samples.jsonl (all)
    summary = write_report(cfg, rows, run_dir, dropped)
    log.close()
    print_summary(summary, len(rows))
    return summary


def write_report(
    cfg: EvalConfig, rows: list[dict[str, Any]], run_dir: Path, dropped: int
) -> dict[str, Any]:
    """``eval.json`` (the figures), ``eval.md`` (figures and a sample table) and
    ``samples.jsonl`` (every pair); returns the figures. ``dropped``: the prompts left out
    because the policy's PPO run trained on them."""
    summary: dict[str, Any] = {
        **summarize(rows),
        "kl_estimator": cfg.eval.kl_estimator,
        "win_rate_ties": "count half",
        "policy": _source(cfg.policy),
        "baseline": _source(cfg.baseline),
        "reward": cfg.reward.function or reward_source(cfg.reward),
        "prompts": cfg.data.prompts,
        "excluded_trained_prompts": dropped,
    }
    summary["warning"] = interval_warning(summary)
    summary["length_warning"] = length_warning(summary, cfg.eval.max_length_gain)
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "eval.md").write_text(eval_markdown(summary, rows, cfg.eval.table_rows))
    with (run_dir / "samples.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return summary
