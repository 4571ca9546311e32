"""The ``rlhf-ray`` command line.

``rlhf-ray ppo [--config F] [key=value ...]`` runs PPO: by default on a local Ray started here,
or on the cluster named by ``--address`` / ``RAY_ADDRESS`` (as under ``ray job submit``).
``rlhf-ray sft`` and ``rlhf-ray train-rm`` run the stages before it the same way.
Config and resource errors print one paragraph and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf_ray.config.ppo import load_config, to_yaml
from rlhf_ray.errors import UserError


def _flags() -> dict[str, argparse.ArgumentParser]:
    """The flags several commands share, each declared once (``parents=`` of a subcommand)."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, help="YAML config (default: the embedded one)")
    config.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.seed=3"
    )
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    run = argparse.ArgumentParser(add_help=False, parents=[config, address])
    run.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    run.add_argument(
        "--run-dir", type=Path, help="where the run writes (default: a new dated dir in ./runs)"
    )
    run.add_argument(
        "--in-process", action="store_true", help="debug: every role in this process, no Ray"
    )
    return {"config": config, "address": address, "run": run}


# command -> (help, the shared flags it takes: "run" = config, address, --print-config,
# --run-dir, --in-process); its own flags are added by _own_flags.
COMMANDS = {
    "ppo": ("run PPO (local Ray by default)", ["run"]),
    "sft": ("supervised fine-tuning on assistant replies (local Ray by default)", ["run"]),
    "train-rm": ("train a Bradley-Terry reward model on preference pairs", ["run"]),
    "eval": ("compare a tuned policy with its baseline on held-out prompts", ["run"]),
    "generate": ("sample from a policy with a run's rollout settings", ["config"]),
    "plan": ("print the actor/resource plan and check it fits", ["config", "address"]),
    "plot": ("PNG curves of runs (several runs: overlaid)", []),
    "replay": ("re-run one dumped round's PPO update in this process (train only)", []),
    "scale": ("resize a running job's rollout pool", []),
    "serve-reward": ("serve a reward over HTTP with Ray Serve", ["address"]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-ray", description="RLHF with PPO as a Ray actor system."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    flags = _flags()
    for name, (what, shared) in COMMANDS.items():
        command = sub.add_parser(name, help=what, parents=[flags[f] for f in shared])
        _own_flags(name, command)
    return parser


def _own_flags(name: str, p: argparse.ArgumentParser) -> None:
    """The flags only command ``name`` takes."""
    if name in ("ppo", "sft", "train-rm"):
        p.add_argument(
            "--resume", action="store_true", help="continue --run-dir's newest checkpoint"
        )
    elif name == "eval":
        p.add_argument("--policy", help="the tuned policy's model directory (policy.path)")
        p.add_argument("--baseline", help="the baseline's model directory (baseline.path)")
        p.add_argument("--reward-model", help="the judging reward model (reward.model.path)")
    elif name == "generate":
        p.add_argument("--policy", type=Path, required=True, help="policy dir (Hugging Face)")
        p.add_argument("--num-prompts", type=int, help="prompts from the data (default: batch)")
        p.add_argument("--prompt", action="append", help="a prompt to use (repeatable)")
        p.add_argument("--seed", type=int, help="sampling seed (default: train.seed)")
        p.add_argument("--out", type=Path, help="also write the samples as JSONL here")
    elif name == "plot":
        p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run dirs")
        p.add_argument("--out", type=Path, help="PNGs' dir (default RUN/plots[/overlay])")
    elif name == "replay":
        p.add_argument("run_dir", type=Path, help="the run's directory")
        p.add_argument("--round", type=int, required=True, help="the dumped round to replay")
        p.add_argument("--atol", type=float, default=1e-6, help="agreement asked of the metrics")
        p.add_argument("--json", action="store_true", help="last line: the metrics as JSON")
    elif name == "scale":
        p.add_argument("run_dir", type=Path, help="the run's directory")
        p.add_argument("--rollout-workers", type=int, required=True, help="from the next round")
    elif name == "serve-reward":
        _serve_reward_flags(p)


def _serve_reward_flags(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--reward-model", help="reward model directory (e.g. of train-rm)")
    source.add_argument("--function", help="reward function 'package.module:callable'")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback: token)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--token-env", help="environment variable holding the bearer token")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body")
    p.add_argument("--name", default="reward", help="Serve app name and route: /NAME/score")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting per replica")
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")


def _new(path: str, *args: Any) -> Callable[[], Any]:
    """A factory of ``module:Class(*args)`` that imports the module only when called (so an
    in-process run never imports ray)."""

    def make() -> Any:
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)(*args)

    return make


@contextlib.contextmanager
def open_workers(
    cfg: Any, args: argparse.Namespace, local: Callable[[], Any], on_ray: Callable[[], Any]
) -> Iterator[Any]:
    """A command's workers, closed on the way out: ``local()`` with ``--in-process``, else
    ``on_ray()`` on the cluster of ``--address`` / ``$RAY_ADDRESS`` (or a local Ray started
    here and stopped after)."""
    with contextlib.ExitStack() as stack:
        if args.in_process:
            workers = local()
        else:
            from rlhf_ray.distributed import connect, disconnect

            connect(cfg, args.address)
            stack.callback(disconnect)
            workers = on_ray()
        stack.callback(workers.close)
        yield workers


def _printed(cfg: Any, args: argparse.Namespace) -> bool:
    """``--print-config``: print the resolved config (and the command stops)."""
    if args.print_config:
        print(to_yaml(cfg), end="")
    return args.print_config


def _local_models(cfg: Any) -> Any:
    """``cfg`` with every model path that is a .gguf file or a ``builtin:`` name converted
    (once, into the cache) to a local directory: here on the driver, before any actor starts."""
    from rlhf_ray.models.sources import resolve_models

    return resolve_models(cfg)


def cmd_ppo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if _printed(cfg, args):
        return 0
    cfg = _local_models(cfg)
    from rlhf_ray.observe.console import ppo_summary, print_summary
    from rlhf_ray.observe.metrics import check_sinks, read_metrics
    from rlhf_ray.observe.runs import new_run_dir
    from rlhf_ray.ppo.preflight import preflight_ppo
    from rlhf_ray.ppo.recovery import run_ppo_recovering

    if args.resume and args.run_dir is None:
        raise UserError("--resume needs --run-dir: the run to continue")
    # before any actor starts
    preflight_ppo(cfg, args.run_dir, args.resume, [os.getcwd()], args.in_process)
    check_sinks(cfg.logging)
    run_dir, started = args.run_dir or new_run_dir(), time.perf_counter()
    local = _new("rlhf_ray.workers.inprocess:InProcessWorkers", cfg)
    with open_workers(cfg, args, local, _new("rlhf_ray.distributed:RayWorkers", cfg)) as workers:
        result = run_ppo_recovering(cfg, workers, run_dir, resume=args.resume).run_dir
    rows = read_metrics(result / "metrics.jsonl")
    print_summary(ppo_summary(result, rows, time.perf_counter() - started))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """``sft`` / ``train-rm``: the stage's learner group in-process or on Ray."""
    from rlhf_ray.config.stages import load_rm_config, load_sft_config

    sft = args.command == "sft"
    cfg = (load_sft_config if sft else load_rm_config)(args.config, args.overrides)
    if _printed(cfg, args):
        return 0
    cfg = _local_models(cfg)
    from rlhf_ray.observe.console import print_summary, stage_summary
    from rlhf_ray.observe.metrics import check_sinks
    from rlhf_ray.observe.runs import new_run_dir
    from rlhf_ray.ppo.preflight import preflight_stage
    from rlhf_ray.stages import rm_role, run_sft, run_train_rm, sft_role
    from rlhf_ray.stages.checkpoint import run_stage_recovering

    if args.resume and args.run_dir is None:
        raise UserError("--resume needs --run-dir: the run to continue")
    preflight_stage(cfg)  # before any actor starts
    check_sinks(cfg.logging)
    role, run = (sft_role(cfg), run_sft) if sft else (rm_role(cfg), run_train_rm)
    run_dir = args.run_dir or new_run_dir(prefix="sft" if sft else "rm")
    timeout = cfg.train.dist_timeout_s
    local = _new("rlhf_ray.workers.inprocess:InProcessStage", role, timeout)
    on_ray = _new("rlhf_ray.distributed:RayStage", role, cfg.cluster, timeout)
    with open_workers(cfg, args, local, on_ray) as workers:
        result = run_stage_recovering(run, cfg, workers, run_dir, args.resume)
    print_summary(stage_summary(args.command, result.run_dir, result.output, result.final))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rlhf_ray.observe.console import Summary, print_summary
    from rlhf_ray.observe.plot import plot_runs

    written = plot_runs(args.run_dirs, args.out)
    print_summary(
        Summary(
            f"plotted {len(args.run_dirs)} run(s)",
            {"figures": f"{len(written)} PNGs"},
            {"plots": written[0].parent.resolve()},
            [f"open {written[-1].resolve()}"],
        )
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from rlhf_ray.observe.console import Summary, print_summary
    from rlhf_ray.ppo.replay import format_comparison, replay_json, replay_round

    result = replay_round(args.run_dir, args.round)
    table, same = format_comparison(result, args.atol)
    print(table)
    where = result.checkpoint or "the initial weights (rebuilt from the config)"
    verdict = f"reproduced within {args.atol:g}" if same else f"DIFFERS (beyond {args.atol:g})"
    print_summary(
        Summary(
            f"replayed round {args.round}",
            {"logged metrics": verdict if result.logged else "no logged row to compare with"},
            {
                "run dir": args.run_dir.resolve(),
                "state before the round": where,
                "batch": args.run_dir.resolve()
                / "rollouts"
                / f"round_{args.round:06d}.safetensors",
            },
            [
                f"rlhf-ray generate --policy {where}/policy"
                if result.checkpoint
                else f"rlhf-ray plot {args.run_dir.resolve()}"
            ],
        )
    )
    if args.json:
        print(replay_json(result))
    return 0 if same or not result.logged else 1


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.models.sources import resolve_model_source
    from rlhf_ray.observe.console import Summary, print_summary
    from rlhf_ray.ppo.generate import format_samples, generate_samples, run_config_of

    policy = Path(resolve_model_source(str(args.policy)))
    config_path = args.config or run_config_of(policy)
    cfg = _local_models(load_config(config_path, args.overrides))
    samples = generate_samples(cfg, policy, args.prompt, args.num_prompts, args.seed)
    print(format_samples(samples))
    artifacts: dict[str, Path | str] = {
        "policy": policy.resolve(),
        "config": config_path or "embedded default",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(s) + "\n" for s in samples))
        artifacts["samples"] = args.out.resolve()
    n = len(samples)
    print_summary(
        Summary(
            f"generated {n} samples",
            {
                "mean score": f"{sum(s['score'] for s in samples) / n:+.4f}",
                "EOS rate": f"{sum(s['has_eos'] for s in samples) / n:.2f}",
                "mean length": f"{sum(s['length'] for s in samples) / n:.1f} tokens",
            },
            artifacts,
            [f"rlhf-ray ppo --config {config_path}" if config_path else "rlhf-ray ppo"],
        )
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rlhf_ray.config.stages import load_eval_config

    flags = {
        "policy.path": args.policy,
        "baseline.path": args.baseline,
        "reward.model.path": args.reward_model,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = load_eval_config(args.config, overrides)
    if _printed(cfg, args):
        return 0
    cfg = _local_models(cfg)
    from rlhf_ray.observe.runs import new_run_dir
    from rlhf_ray.ppo.preflight import check_eval_models
    from rlhf_ray.stages.evaluate import run_eval, with_heldout_prompts

    cfg = with_heldout_prompts(cfg)  # builtin:arithmetic's run: its held-out split by default
    check_eval_models(cfg)
    run_dir = args.run_dir or new_run_dir(prefix="eval")
    local = _new("rlhf_ray.workers.evaluation:InProcessEvalWorkers", cfg)
    on_ray = _new("rlhf_ray.distributed.evaluation:RayEvalWorkers", cfg)
    with open_workers(cfg, args, local, on_ray) as workers:
        run_eval(cfg, workers, run_dir)
    print(f"run dir: {run_dir.resolve()}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # config errors first, before importing ray
    cfg = _local_models(cfg)  # the memory estimate reads each model's config.json
    from rlhf_ray.distributed.plan import check_plan

    return check_plan(cfg, args.address)


def cmd_scale(args: argparse.Namespace) -> int:
    from rlhf_ray.ppo.control import request_rollout_workers

    request_rollout_workers(args.run_dir, args.rollout_workers)
    print(
        f"requested {args.rollout_workers} rollout workers for {args.run_dir}; "
        "the run applies it before its next round"
    )
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from rlhf_ray.distributed.reward_service import serve_from_args
    from rlhf_ray.models.sources import resolve_model_source

    if args.reward_model is not None:
        args.reward_model = resolve_model_source(args.reward_model)

    return serve_from_args(args, [os.getcwd()])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "ppo": cmd_ppo,
        "sft": cmd_stage,
        "train-rm": cmd_stage,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "plan": cmd_plan,
        "plot": cmd_plot,
        "replay": cmd_replay,
        "scale": cmd_scale,
        "serve-reward": cmd_serve_reward,
    }
    try:
        return handlers[args.command](args)
    except UserError as exc:
        cause = getattr(exc, "cause", None)  # raised in an actor: Ray's wrapper adds a traceback
        print(f"rlhf-ray: {cause if isinstance(cause, UserError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
