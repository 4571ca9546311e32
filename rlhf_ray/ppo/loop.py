"""The PPO loop, readable top to bottom.

``run_ppo`` is the algorithm box: each round numbers the steps of docs/design.md §2 and times each as
a named phase. Setup lives in the ``build_*`` helpers above it; the loop never branches on
infrastructure: it talks to a ``Workers`` object, in-process or Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.algo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    explained_variance,
    grpo_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_rewards,
)
from rlhf_ray.config.ppo import AlgoConfig, Config, PPOConfig, policy_tokenizer, to_yaml
from rlhf_ray.data.sampler import PromptSampler
from rlhf_ray.data.tokenization import Tokenizer, build_tokenizer, chat_template_start
from rlhf_ray.observe.metrics import MetricsLog, PhaseTimer, open_metrics_log
from rlhf_ray.ppo.batches import PromptTexts, build_prompts, check_rollout, tokenize_prompts
from rlhf_ray.ppo.checkpoint import (
    check_resumable,
    latest_checkpoint,
    save_checkpoint,
    save_model_dirs,
    truncate_metrics,
)
from rlhf_ray.ppo.control import requested_rollout_workers
from rlhf_ray.ppo.dumps import dump_due, dump_round
from rlhf_ray.ppo.sampling_check import check_logprob_gap
from rlhf_ray.rewards.shaping import ScoreShaper
from rlhf_ray.rewards.terms import reward_metrics
from rlhf_ray.types import PPOBatch, PromptBatch, Rollout
from rlhf_ray.workers.interface import Workers, check_sync, kl_logprobs

# --------------------------------------------------------------------------------------------
# setup helpers


def build_kl_controller(ppo: PPOConfig) -> FixedKLController | AdaptiveKLController:
    if ppo.adaptive_kl:
        return AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(ppo.kl_coef)


def expand_groups(index: list[int], samples_per_prompt: int) -> list[int]:
    """The round's rows: each prompt index repeated n times in a row (group g: [g*n, (g+1)*n))."""
    return [i for i in index for _ in range(samples_per_prompt)]


def critic_free_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, algo: AlgoConfig, group_size: int, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of a critic-free estimator from KL-penalised token rewards:
    grpo/rloo compare each sample's total reward with its group's, reinforce_pp whitens
    per-token returns over the batch."""
    if algo.estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma)
    totals = sequence_rewards(rewards, mask)
    returns = totals[:, None] * mask.to(totals.dtype)
    if algo.estimator == "grpo":
        return grpo_advantages(totals, mask, group_size, algo.grpo_norm_std), returns
    if algo.estimator == "rloo":
        return rloo_advantages(totals, mask, group_size), returns
    raise ValueError(f"{algo.estimator!r} is not a critic-free estimator")


def compute_advantages(
    rollout: Rollout,
    scored: dict[str, torch.Tensor],
    kl_coef: float,
    ppo: PPOConfig,
    algo: AlgoConfig | None = None,
    group_size: int = 1,
) -> tuple[PPOBatch, dict[str, float]]:
    """Step 3: per-token KL-penalised rewards, then GAE and whitening (``algo.estimator`` gae,
    the default) or a critic-free estimator over groups of ``group_size`` rows (pure math).
    ``scored["scores"]`` are the shaped scores (``ScoreShaper``)."""
    algo = algo or AlgoConfig()
    mask = rollout.response_mask
    scores = scored["scores"]
    rewards, kl = kl_penalized_rewards(
        scores, kl_logprobs(scored), scored["ref_logprobs"], mask, kl_coef, ppo.kl_estimator
    )
    stats: dict[str, float] = {}
    if algo.estimator == "gae":
        values = scored["values"]
        advantages, returns = compute_gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        stats["ppo/explained_variance"] = explained_variance(values, returns, mask)
    else:
        values = torch.zeros_like(rewards)
        advantages, returns = critic_free_advantages(rewards, mask, algo, group_size, ppo.gamma)
    batch = PPOBatch(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        response_mask=mask,
        old_logprobs=scored["old_logprobs"],
        old_values=values,
        advantages=advantages,
        returns=returns,
        ref_logprobs=scored["ref_logprobs"],
        prompt_len=rollout.prompt_len,
    )
    stats |= {
        "ppo/kl": float(kl.sum(-1).mean()),
        "ppo/kl_coef": kl_coef,
        "ppo/return_mean": float(masked_mean(returns, mask)),
        "rollout/score_mean": float(scores.mean()),
        "rollout/logprob_gap": float(
            masked_mean((rollout.sampler_logprobs - scored["old_logprobs"]).abs(), mask)
        ),
        "rollout/outside_filter_tokens": int(scored["outside_filter"].sum())
        if "outside_filter" in scored
        else 0,
    }
    return batch, stats


def rollout_stats(rollout: Rollout, raw_scores: torch.Tensor, seconds: float) -> dict[str, float]:
    lengths = rollout.response_mask.sum(-1).float()
    return {
        "rollout/reward_mean": float(raw_scores.mean()),
        "rollout/reward_std": float(raw_scores.std()) if len(raw_scores) > 1 else 0.0,
        "rollout/num_samples": len(rollout),
        "rollout/response_length": float(lengths.mean()),
        "rollout/eos_rate": float(rollout.has_eos.float().mean()),
        "rollout/tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9),
    }


@dataclass
class RunResult:
    run_dir: Path
    rounds: int


@dataclass
class DriverState:
    """What the driver itself carries from round to round; saved with every checkpoint."""

    sampler: PromptSampler
    kl_ctl: FixedKLController | AdaptiveKLController
    shaper: ScoreShaper  # normalise, missing-EOS penalty, clip

    def state_dict(self, round_index: int) -> dict:
        return {
            "round": round_index,
            "kl_ctl": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "score_shaper": self.shaper.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if "score_shaper" in state:
            self.shaper.load_state_dict(state["score_shaper"])


@dataclass
class PromptFeed:
    """The prompts a run samples from, and the round's batch of them, tokenized."""

    cfg: Config
    tokenizer: Tokenizer
    prompts: PromptTexts
    sampler: PromptSampler

    @classmethod
    def build(cls, cfg: Config) -> PromptFeed:
        tokenizer = build_tokenizer(policy_tokenizer(cfg))
        prompts = build_prompts(cfg, tokenizer)
        return cls(
            cfg,
            tokenizer,
            prompts,
            PromptSampler(len(prompts), cfg.rollout.batch_size, cfg.train.seed),
        )

    def next_batch(self) -> tuple[list[int], PromptBatch, dict[str, float]]:
        """The next prompts' row index (``samples_per_prompt`` rows each), their batch, and the
        data figures: prompts cut to ``data.max_prompt_tokens`` (a chat template's start is
        kept, as in sft/rm) and rows of the prompt set skipped when it was loaded."""
        index = expand_groups(self.sampler.next_batch(), self.cfg.rollout.samples_per_prompt)
        batch, truncated = tokenize_prompts(
            self.tokenizer,
            self.prompts,
            index,
            self.cfg.data.max_prompt_tokens,
            chat_template_start(self.tokenizer),
        )
        stats = {
            "data/truncated_prompts": truncated,
            "data/skipped_rows": len(self.prompts.skipped),
        }
        return index, batch, stats


def round_metrics(
    round_index: int,
    cfg: Config,
    rollout: Rollout,
    scored: dict[str, Any],
    adv_stats: dict[str, float],
    train_stats: dict[str, float],
    times: dict[str, float],
) -> dict[str, float]:
    """The round's figures from its rollout, scores, advantages and updates (metrics.jsonl)."""
    return {
        "round": round_index,
        "weights/version": round_index,  # the weights that sampled: after `round` updates
        "ppo/critic_warmup": float(round_index < cfg.ppo.critic_warmup_rounds),
        **rollout_stats(rollout, scored["scores"], times["time/generate"]),
        **reward_metrics(scored),  # reward/<part>_mean, reward/remote_*
        **adv_stats,
        **{f"ppo/{k}": v for k, v in train_stats.items()},
        "ppo/skipped_steps": sum(v for k, v in train_stats.items() if k.endswith("skipped_steps")),
        **times,
    }


# --------------------------------------------------------------------------------------------
# the loop


def start_log(cfg: Config, run_dir: Path, start: int) -> MetricsLog:
    """Write ``RUN/config.yaml`` and open ``RUN/metrics.jsonl`` (and the progress display) for
    rounds ``start`` on."""
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    dumped = cfg.model_dump(mode="json")
    return open_metrics_log(run_dir, cfg.logging, cfg.train.rounds, start, dumped)


def resume_from_checkpoint(cfg: Config, workers: Workers, run_dir: Path, state: DriverState) -> int:
    """Restore the newest complete checkpoint of ``run_dir``; returns the round to start at."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        print(f"[rlhf_ray] no complete checkpoint in {run_dir}: starting from round 0", flush=True)
        truncate_metrics(run_dir / "metrics.jsonl", -1)
        return 0
    check_resumable(checkpoint, cfg)
    saved = json.loads((checkpoint / "driver_state.json").read_text())
    workers.load_state(checkpoint)
    state.load_state_dict(saved)
    truncate_metrics(run_dir / "metrics.jsonl", saved["round"])
    print(f"[rlhf_ray] resumed from {checkpoint}", flush=True)
    return saved["round"] + 1


def run_ppo(cfg: Config, workers: Workers, run_dir: Path, resume: bool = False) -> RunResult:
    """Generate -> score -> advantage -> update -> sync -> log, ``cfg.train.rounds`` times
    (from the newest checkpoint of ``run_dir`` on, if ``resume``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    feed = PromptFeed.build(cfg)
    state = DriverState(feed.sampler, build_kl_controller(cfg.ppo), ScoreShaper(cfg.reward))
    start = resume_from_checkpoint(cfg, workers, run_dir, state) if resume else 0
    log = start_log(cfg, run_dir, start)  # RUN/config.yaml, RUN/metrics.jsonl
    timer = PhaseTimer()
    workers.sync(version=start)  # rollout workers start from the learner's weights
    check_sync(workers, cfg.sync, start, cfg.policy.model.dtype)

    for round_index in range(start, cfg.train.rounds):
        version, started = round_index, time.perf_counter()  # after `round_index` updates

        # 0. scale: apply a requested rollout pool size (`rlhf-ray scale RUN --rollout-workers N`)
        workers.scale_rollout(requested_rollout_workers(run_dir, cfg.rollout.num_workers))

        # 1. generate: n samples per prompt (a group of rows each), split over the rollout pool
        with timer.phase("generate"):
            index, batch, data_stats = feed.next_batch()
            rollout = workers.generate(batch, round_index, version)
            check_rollout(rollout, version, index)

        # 2. score: reference logprobs, old logprobs, values (with a critic) and rewards
        with timer.phase("score"):
            scored = workers.score(rollout)

        # 3. advantage: KL-penalised per-token rewards, then the estimator (on the driver)
        with timer.phase("advantage"):
            shaped = {**scored, "scores": state.shaper(scored["scores"], rollout.has_eos)}
            kl_coef, group = state.kl_ctl.value, cfg.rollout.samples_per_prompt
            ppo_batch, adv_stats = compute_advantages(
                rollout, shaped, kl_coef, cfg.ppo, cfg.algo, group
            )
            check_logprob_gap(adv_stats["rollout/logprob_gap"], cfg, round_index)

        # 4. update: PPO epochs x minibatches on the policy (and value) learners
        with timer.phase("update"):
            train_stats = workers.update(ppo_batch, round_index)
        state.kl_ctl.update(adv_stats["ppo/kl"], len(rollout))

        # 5. sync: the new policy weights go to every rollout worker, versioned
        with timer.phase("sync"):
            workers.sync(version=version + 1)
            sync_stats = check_sync(workers, cfg.sync, version + 1, cfg.policy.model.dtype)

        # 6. log, dump (RUN/rollouts/, for replay) and checkpoint
        row = round_metrics(round_index, cfg, rollout, scored, adv_stats, train_stats, timer.pop())
        row.update(**state.shaper.stats(), **data_stats, **sync_stats, **workers.info())
        log.write({**row, "time/round": time.perf_counter() - started})
        if dump_due(cfg.logging.dump_rollouts_every, round_index):
            kl = (adv_stats["ppo/kl_coef"], cfg.ppo.kl_estimator)
            dump_round(run_dir, round_index, rollout, scored, ppo_batch, shaped["scores"], *kl)
        if cfg.checkpoint.every and (round_index + 1) % cfg.checkpoint.every == 0:
            save_checkpoint(workers, feed.tokenizer, cfg, run_dir, state.state_dict(round_index))

    save_model_dirs(workers, feed.tokenizer, run_dir)
    log.close()
    return RunResult(run_dir=run_dir, rounds=cfg.train.rounds)
