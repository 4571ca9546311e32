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
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_ppo(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from rlhf_ray.driver import new_run_dir
    from rlhf_ray.preflight import preflight_ppo

    if args.resume and args.run_dir is None:
        raise UserError("--resume needs --run-dir: the run to continue")
    preflight_ppo(cfg, args.run_dir, args.resume, [os.getcwd()])  # before any actor starts
    run_dir = args.run_dir or new_run_dir()
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
    print(f"run dir: {result.resolve()}")
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
    from rlhf_ray.driver import new_run_dir
    from rlhf_ray.preflight import preflight_stage
    from rlhf_ray.stages import rm_role, run_sft, run_train_rm, sft_role

    preflight_stage(cfg)  # before any actor starts

    role = sft_role(cfg) if sft else rm_role(cfg)  # type: ignore[arg-type]
    run = run_sft if sft else run_train_rm
    run_dir = args.run_dir or new_run_dir(prefix="sft" if sft else "rm")
    timeout = cfg.train.dist_timeout_s
    if args.in_process:
        from rlhf_ray.workers.inprocess import InProcessStage

        workers = InProcessStage(role, timeout)
        try:
            run(cfg, workers, run_dir)  # type: ignore[arg-type]
        finally:
            workers.close()
    else:
        from rlhf_ray.distributed import RayStage, connect, disconnect

        connect(cfg, args.address)
        try:
            ray_workers = RayStage(role, cfg.cluster, timeout)
            try:
                run(cfg, ray_workers, run_dir)  # type: ignore[arg-type]
            finally:
                ray_workers.close()
        finally:
            disconnect()
    print(f"run dir: {run_dir.resolve()}")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"ppo": cmd_ppo, "eval": cmd_eval, "plan": cmd_plan, "scale": cmd_scale, "sft": cmd_stage,
                "train-rm": cmd_stage}  # fmt: skip
    try:
        return handlers[args.command](args)
    except UserError as exc:
        cause = getattr(exc, "cause", None)  # raised in an actor: Ray's wrapper adds a traceback
        print(f"rlhf-ray: {cause if isinstance(cause, UserError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
