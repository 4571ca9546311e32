"""The ``rlhf-ray`` command line.

``rlhf-ray ppo [--config F] [key=value ...]`` runs PPO: by default on a local Ray started here,
or on the cluster named by ``--address`` / ``RAY_ADDRESS`` (as under ``ray job submit``).
``rlhf-ray sft`` and ``rlhf-ray train-rm`` run the stages before it the same way.
Config and resource errors print one paragraph and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlhf_ray.config import Config, load_config, to_yaml
from rlhf_ray.errors import UserError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (default: the embedded one)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. rollout.num_workers=3",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-ray", description="RLHF with PPO as a Ray actor system."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ppo = sub.add_parser("ppo", help="run PPO (local Ray by default)")
    _config_args(ppo)
    ppo.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    ppo.add_argument(
        "--run-dir",
        type=Path,
        help="where the run writes (default: a new dated directory under ./runs)",
    )
    ppo.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its newest complete checkpoint",
    )
    ppo.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    ppo.add_argument(
        "--in-process",
        action="store_true",
        help="debug: run every role as a plain object in this process, no Ray",
    )

    for name, what in (("sft", "supervised fine-tuning on assistant replies"),
                       ("train-rm", "train a Bradley-Terry reward model on preference pairs")):  # fmt: skip
        stage = sub.add_parser(name, help=f"{what} (local Ray by default)")
        _config_args(stage)
        stage.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )
        stage.add_argument(
            "--run-dir", type=Path, help="where the run writes (default: a new dated directory)"
        )
        stage.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
        stage.add_argument(
            "--in-process", action="store_true", help="one rank in this process, no Ray"
        )
        stage.add_argument(
            "--resume", action="store_true", help="continue --run-dir from its newest checkpoint"
        )
    plot = sub.add_parser("plot", help="PNG curves of runs (several runs: overlaid)")
    plot.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run dirs")
    plot.add_argument(
        "--out", type=Path, help="where the PNGs go (default RUN/plots, or RUN/plots/overlay)"
    )

    replay = sub.add_parser(
        "replay", help="re-run one dumped round's PPO update in this process (train only)"
    )
    replay.add_argument("run_dir", type=Path, help="the run's directory")
    replay.add_argument("--round", type=int, required=True, help="the dumped round to replay")
    replay.add_argument(
        "--atol", type=float, default=1e-6, help="agreement asked of the logged metrics"
    )
    replay.add_argument(
        "--json", action="store_true", help="last line: the replayed metrics as one JSON object"
    )

    gen = sub.add_parser("generate", help="sample from a policy with a run's rollout settings")
    _config_args(gen)
    gen.add_argument("--policy", type=Path, required=True, help="policy dir (Hugging Face)")
    gen.add_argument("--num-prompts", type=int, help="prompts from the data (default: batch)")
    gen.add_argument("--prompt", action="append", help="a prompt to use (repeatable)")
    gen.add_argument("--seed", type=int, help="sampling seed (default: train.seed)")
    gen.add_argument("--out", type=Path, help="also write the samples as JSONL here")

    evaluate = sub.add_parser(
        "eval", help="compare a tuned policy with its baseline on held-out prompts"
    )
    _config_args(evaluate)
    evaluate.add_argument("--policy", help="the tuned policy's model directory (policy.path)")
    evaluate.add_argument("--baseline", help="the baseline's model directory (baseline.path)")
    evaluate.add_argument(
        "--reward-model", help="the judging reward model's directory (reward.model.path)"
    )
    evaluate.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    evaluate.add_argument(
        "--run-dir", type=Path, help="where eval.json/eval.md go (default: a new ./runs/eval-*)"
    )
    evaluate.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    evaluate.add_argument(
        "--in-process", action="store_true", help="run every role in this process, no Ray"
    )

    plan = sub.add_parser("plan", help="print the actor/resource plan and check it fits")
    _config_args(plan)
    plan.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS)")
    scale = sub.add_parser("scale", help="resize a running job's rollout pool")
    scale.add_argument("run_dir", type=Path, help="the run's directory")
    scale.add_argument(
        "--rollout-workers", type=int, required=True, help="rollout workers from the next round on"
    )
    _serve_reward_args(sub)
    return parser


def _serve_reward_args(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve-reward", help="serve a reward over HTTP with Ray Serve")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--reward-model", help="reward model directory (e.g. of train-rm)")
    source.add_argument("--function", help="reward function 'package.module:callable'")
    serve.add_argument("--replicas", type=int, default=1, help="Serve replicas")
    serve.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    serve.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback: token)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument("--token-env", help="environment variable holding the bearer token")
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body")
    serve.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_ppo(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from rlhf_ray.console import ppo_summary, print_summary
    from rlhf_ray.driver import new_run_dir
    from rlhf_ray.metrics import check_sinks, read_metrics
    from rlhf_ray.preflight import preflight_ppo

    if args.resume and args.run_dir is None:
        raise UserError("--resume needs --run-dir: the run to continue")
    preflight_ppo(cfg, args.run_dir, args.resume, [os.getcwd()])  # before any actor starts
    check_sinks(cfg.logging)
    run_dir = args.run_dir or new_run_dir()
    started = time.perf_counter()
    if args.in_process:
        from rlhf_ray.workers.inprocess import InProcessWorkers

        result = _run(cfg, lambda: InProcessWorkers(cfg), run_dir, args.resume)
    else:
        from rlhf_ray.distributed import RayWorkers, connect, disconnect

        connect(cfg, args.address)
        try:
            result = _run(cfg, lambda: RayWorkers(cfg), run_dir, args.resume)
        finally:
            disconnect()
    rows = read_metrics(result / "metrics.jsonl")
    print_summary(ppo_summary(result, rows, time.perf_counter() - started))
    return 0


def _run(cfg: Config, make_workers, run_dir: Path, resume: bool) -> Path:
    from rlhf_ray.recovery import run_ppo_recovering

    workers = make_workers()
    try:
        return run_ppo_recovering(cfg, workers, run_dir, resume=resume).run_dir
    finally:
        workers.close()


def cmd_stage(args: argparse.Namespace) -> int:
    """``sft`` / ``train-rm``: the stage's learner group in-process or on Ray."""
    from rlhf_ray.stage_config import load_rm_config, load_sft_config

    sft = args.command == "sft"
    cfg = (load_sft_config if sft else load_rm_config)(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from rlhf_ray.console import print_summary, stage_summary
    from rlhf_ray.driver import new_run_dir
    from rlhf_ray.metrics import check_sinks
    from rlhf_ray.preflight import preflight_stage
    from rlhf_ray.stages import rm_role, run_sft, run_train_rm, sft_role
    from rlhf_ray.stages.checkpoint import run_stage_recovering

    if args.resume and args.run_dir is None:
        raise UserError("--resume needs --run-dir: the run to continue")
    preflight_stage(cfg)  # before any actor starts

    role = sft_role(cfg) if sft else rm_role(cfg)  # type: ignore[arg-type]
    run = run_sft if sft else run_train_rm
    check_sinks(cfg.logging)
    run_dir = args.run_dir or new_run_dir(prefix="sft" if sft else "rm")
    timeout = cfg.train.dist_timeout_s
    if args.in_process:
        from rlhf_ray.workers.inprocess import InProcessStage

        workers = InProcessStage(role, timeout)
        try:
            result = run(cfg, workers, run_dir, resume=args.resume)  # type: ignore[arg-type]
        finally:
            workers.close()
    else:
        from rlhf_ray.distributed import RayStage, connect, disconnect

        connect(cfg, args.address)
        try:
            ray_workers = RayStage(role, cfg.cluster, timeout)
            try:
                result = run_stage_recovering(run, cfg, ray_workers, run_dir, args.resume)
            finally:
                ray_workers.close()
        finally:
            disconnect()
    print_summary(stage_summary(args.command, result.run_dir, result.output, result.final))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rlhf_ray.console import Summary, print_summary
    from rlhf_ray.plot import plot_runs

    written = plot_runs(args.run_dirs, args.out)
    print_summary(Summary(
        f"plotted {len(args.run_dirs)} run(s)",
        {"figures": f"{len(written)} PNGs"},
        {"plots": written[0].parent.resolve()},
        [f"open {written[-1].resolve()}"],
    ))  # fmt: skip
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from rlhf_ray.console import Summary, print_summary
    from rlhf_ray.replay import format_comparison, replay_json, replay_round

    result = replay_round(args.run_dir, args.round)
    table, same = format_comparison(result, args.atol)
    print(table)
    where = result.checkpoint or "the initial weights (rebuilt from the config)"
    verdict = f"reproduced within {args.atol:g}" if same else f"DIFFERS (beyond {args.atol:g})"
    print_summary(Summary(
        f"replayed round {args.round}",
        {"logged metrics": verdict if result.logged else "no logged row to compare with"},
        {"run dir": args.run_dir.resolve(), "state before the round": where,
         "batch": args.run_dir.resolve() / "rollouts" / f"round_{args.round:06d}.safetensors"},
        [f"rlhf-ray generate --policy {where}/policy" if result.checkpoint else
         f"rlhf-ray plot {args.run_dir.resolve()}"],
    ))  # fmt: skip
    if args.json:
        print(replay_json(result))
    return 0 if same or not result.logged else 1


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from rlhf_ray.config import load_config
    from rlhf_ray.console import Summary, print_summary
    from rlhf_ray.generate import format_samples, generate_samples, run_config_of

    config_path = args.config or run_config_of(args.policy)
    cfg = load_config(config_path, args.overrides)
    samples = generate_samples(cfg, args.policy, args.prompt, args.num_prompts, args.seed)
    print(format_samples(samples))
    artifacts: dict[str, Path | str] = {
        "policy": args.policy.resolve(),
        "config": config_path or "embedded default",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(s) + "\n" for s in samples))
        artifacts["samples"] = args.out.resolve()
    n = len(samples)
    print_summary(Summary(
        f"generated {n} samples",
        {"mean score": f"{sum(s['score'] for s in samples) / n:+.4f}",
         "EOS rate": f"{sum(s['has_eos'] for s in samples) / n:.2f}",
         "mean length": f"{sum(s['length'] for s in samples) / n:.1f} tokens"},
        artifacts,
        [f"rlhf-ray ppo --config {config_path}" if config_path else "rlhf-ray ppo"],
    ))  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rlhf_ray.stage_config import load_eval_config

    flags = {"policy.path": args.policy, "baseline.path": args.baseline,
             "reward.model.path": args.reward_model}  # fmt: skip
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = load_eval_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from rlhf_ray.driver import new_run_dir
    from rlhf_ray.preflight import check_eval_models
    from rlhf_ray.stages.evaluate import run_eval

    check_eval_models(cfg)
    run_dir = args.run_dir or new_run_dir(prefix="eval")
    if args.in_process:
        from rlhf_ray.workers.evaluation import InProcessEvalWorkers

        workers: Any = InProcessEvalWorkers(cfg)
        try:
            run_eval(cfg, workers, run_dir)
        finally:
            workers.close()
    else:
        from rlhf_ray.distributed import connect, disconnect
        from rlhf_ray.distributed.evaluation import RayEvalWorkers

        connect(cfg, args.address)
        try:
            workers = RayEvalWorkers(cfg)
            try:
                run_eval(cfg, workers, run_dir)
            finally:
                workers.close()
        finally:
            disconnect()
    print(f"run dir: {run_dir.resolve()}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _load(args)  # config errors first, before importing ray
    from rlhf_ray.distributed.plan import check_plan

    return check_plan(cfg, args.address)


def cmd_scale(args: argparse.Namespace) -> int:
    from rlhf_ray.control import request_rollout_workers

    request_rollout_workers(args.run_dir, args.rollout_workers)
    print(
        f"requested {args.rollout_workers} rollout workers for {args.run_dir}; "
        "the run applies it before its next round"
    )
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from rlhf_ray.distributed.reward_service import serve_from_args

    return serve_from_args(args, [os.getcwd()])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"ppo": cmd_ppo, "eval": cmd_eval, "plan": cmd_plan, "scale": cmd_scale,
                "sft": cmd_stage, "train-rm": cmd_stage, "plot": cmd_plot, "replay": cmd_replay,
                "generate": cmd_generate, "serve-reward": cmd_serve_reward}  # fmt: skip
    try:
        return handlers[args.command](args)
    except UserError as exc:
        cause = getattr(exc, "cause", None)  # raised in an actor: Ray's wrapper adds a traceback
        print(f"rlhf-ray: {cause if isinstance(cause, UserError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
