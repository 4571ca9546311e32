"""``rlhf-ray generate --policy DIR``: the rollout-only split mode, in this process.

A ``RolloutGenerator`` loads the policy in ``DIR`` (Hugging Face format, e.g. ``RUN/policy`` or a
checkpoint's ``policy/``) and samples with the run's rollout settings (temperature, top-k/p,
``max_new_tokens``), tokenizer and prompts; the run's reward scores each sample. The config is
``--config`` if given, else the ``config.yaml`` of the run that ``DIR`` belongs to, else the
embedded default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf_ray.config.ppo import Config, resolve_tokenizer


def run_config_of(policy_dir: Path) -> Path | None:
    """``RUN/config.yaml`` for ``RUN/policy`` or ``RUN/checkpoints/round_X/policy``."""
    for parent in (policy_dir.parent, *policy_dir.parents[1:3]):
        if (parent / "config.yaml").exists():
            return parent / "config.yaml"
    return None


def generate_samples(
    cfg: Config,
    policy_dir: Path,
    prompts: list[str] | None = None,
    num_prompts: int | None = None,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Sample one response per prompt (``prompts``, else the first ``num_prompts`` of the run's
    data, default ``rollout.batch_size``) and score it; one dict per sample."""
    from rlhf_ray.data.tokenization import build_tokenizer, chat_template_start
    from rlhf_ray.ppo.batches import build_prompts, tokenize_prompts
    from rlhf_ray.ppo.preflight import check_rollout_backend
    from rlhf_ray.workers.scorers import RewardScorer
    from rlhf_ray.workers.vllm_rollout import generator_class, generator_kwargs

    if not (policy_dir / "config.json").exists():
        from rlhf_ray.errors import UserError

        raise UserError(f"{policy_dir} is not a policy directory (no config.json)")
    tok_cfg = resolve_tokenizer(cfg.tokenizer, str(policy_dir))  # 'auto': the policy dir's own
    tokenizer = build_tokenizer(tok_cfg)
    texts = prompts or build_prompts(cfg, tokenizer)[: num_prompts or cfg.rollout.batch_size]
    spec = cfg.policy.model.model_copy(update={"path": str(policy_dir)})
    check_rollout_backend(cfg.rollout, "--policy", spec)  # before the engine starts
    generator = generator_class(cfg.rollout)(spec, tok_cfg, cfg.rollout, **generator_kwargs(cfg))
    batch, _ = tokenize_prompts(
        tokenizer,
        texts,
        list(range(len(texts))),
        cfg.data.max_prompt_tokens,
        chat_template_start(tokenizer) if cfg.data.chat_template else None,
    )
    rollout = generator.generate(batch, cfg.train.seed if seed is None else seed, generator.version)
    scores = RewardScorer(cfg.reward, tok_cfg, search_path=[os.getcwd()]).score(rollout)
    lengths = rollout.response_mask.sum(-1)
    return [
        {
            "prompt": rollout.prompts[i],
            "response": rollout.responses[i],
            "response_ids": rollout.response_ids[i][: int(lengths[i])].tolist(),
            "has_eos": bool(rollout.has_eos[i]),
            "length": int(lengths[i]),
            "score": float(scores[i]),
            "logprob_sum": float(rollout.sampler_logprobs[i].sum()),
        }
        for i in range(len(rollout))
    ]


def format_samples(samples: list[dict[str, Any]], width: int = 100) -> str:
    out = []
    for i, s in enumerate(samples):
        prompt = s["prompt"].replace("\n", "\\n")
        prompt = prompt if len(prompt) <= width else "..." + prompt[-(width - 3) :]
        eos = "" if s["has_eos"] else ", no EOS"
        out.append(f"[{i}] prompt:   {prompt}")
        out.append(
            f"    response: {s['response']!r}  (score {s['score']:+.4f}, {s['length']} tokens{eos})"
        )
    return "\n".join(out)
