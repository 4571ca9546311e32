"""The ready job configs under jobs/, their Ray runtime envs and the documented commands.

Nothing here starts Ray: configs are loaded and planned offline (against their
``cluster.nodes``), runtime envs are checked with Ray's own validation and packaging code, and
the ``ray job submit`` commands of jobs/README.md are parsed by Ray's own CLI definition.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import build_parser
from rlhf_ray.config.ppo import Config, load_config
from rlhf_ray.config.stages import load_eval_config, load_rm_config, load_sft_config
from rlhf_ray.distributed.plan import Node, resource_plan, shortfalls

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def _is_runtime_env(path: Path) -> bool:
    return path.name.startswith("runtime_env")


# stage jobs (rlhf-ray sft / train-rm) are named after their stage; the rest are PPO jobs
STAGE_LOADERS = {"sft": load_sft_config, "train-rm": load_rm_config, "eval": load_eval_config}
STAGE_PREFIXES = {"sft_": "sft", "rm_": "train-rm", "eval_": "eval"}


def _stage_of(path: Path) -> str | None:
    return next((s for p, s in STAGE_PREFIXES.items() if path.name.startswith(p)), None)


STAGE_CONFIGS = sorted(p for p in JOBS.glob("*.yaml") if _stage_of(p))
CONFIGS = sorted(p for p in JOBS.glob("*.yaml") if not _is_runtime_env(p) and not _stage_of(p))
RUNTIME_ENVS = sorted(p for p in JOBS.glob("*.yaml") if _is_runtime_env(p))
GPU_JOBS = ["ppo_1b_hh.yaml", "ppo_8b_hh.yaml"]


def _load(name: str) -> Config:
    return load_config(JOBS / name)


def _described_nodes(cfg: Config) -> list[Node]:
    assert cfg.cluster.nodes, "the job describes no cluster (cluster.nodes)"
    return [Node(n.cpus, n.gpus) for n in cfg.cluster.nodes for _ in range(n.count)]


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # plan offline, always
    return subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "plan", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the configs --------------------------------------------------------------------------------


def test_the_documented_jobs_exist():
    names = {p.name for p in CONFIGS} | {p.name for p in RUNTIME_ENVS}
    assert {"debug_cpu.yaml", *GPU_JOBS, "runtime_env.yaml", "runtime_env_cpu.yaml"} <= names
    assert set(ESTIMATOR_JOBS) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_job_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_stage_jobs_exist_and_load_with_their_stage():
    names = {p.name for p in STAGE_CONFIGS}
    assert {"sft_hh.yaml", "rm_hh.yaml", "sft_1b_hh.yaml", "rm_1b_hh.yaml"} <= names
    for path in STAGE_CONFIGS:
        STAGE_LOADERS[_stage_of(path)](path)


def test_eval_jobs_judge_the_stage_outputs():
    cpu, gpu = load_eval_config(JOBS / "eval_hh.yaml"), load_eval_config(JOBS / "eval_1b_hh.yaml")
    assert (cpu.policy.path, cpu.baseline.path, cpu.reward.model.path) == (
        "/tmp/rlhf-runs/ppo-hh/policy", "/tmp/rlhf-runs/sft-hh/model",
        "/tmp/rlhf-runs/rm-hh/reward_model")  # fmt: skip
    assert cpu.rollout.num_gpus_per_worker == 0 and gpu.rollout.num_gpus_per_worker == 1
    assert gpu.reward.model.path == _load("ppo_1b_hh.yaml").reward.model.path


def test_1b_jobs_chain_the_stage_outputs():
    sft_run = "/mnt/shared/runs/sft-1b-hh"
    rm_run = "/mnt/shared/runs/rm-1b-hh"
    assert f"--run-dir {sft_run}" in (JOBS / "sft_1b_hh.yaml").read_text()
    assert load_rm_config(JOBS / "rm_1b_hh.yaml").model.path == f"{sft_run}/model"
    assert f"--run-dir {rm_run}" in (JOBS / "rm_1b_hh.yaml").read_text()
    ppo = _load("ppo_1b_hh.yaml")
    assert (ppo.policy.model.path, ppo.reward.model.path) == (
        f"{sft_run}/model",
        f"{rm_run}/reward_model",
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_job_fits_the_cluster_it_describes(path: Path):
    cfg = load_config(path)
    assert shortfalls(resource_plan(cfg), _described_nodes(cfg)) == []


def test_debug_cpu_job_fits_two_cores_without_downloads():
    cfg = _load("debug_cpu.yaml")
    plan = resource_plan(cfg)
    assert sum(r.total_cpus for r in plan) <= 2
    assert sum(r.total_gpus for r in plan) == 0
    assert cfg.cluster.num_cpus == 2
    # the shape the job is meant to exercise
    assert (cfg.policy.num_ranks, cfg.policy.zero_stage, cfg.policy.engine) == (2, 2, "deepspeed")
    assert cfg.value.num_ranks == 1 and cfg.rollout.num_workers == 2
    assert (cfg.rollout.batch_size, cfg.ppo.minibatch_size) == (16, 8)
    assert cfg.train.rounds <= 10
    # nothing to download: preset models, byte tokenizer, bundled prompts, a built-in reward
    assert cfg.policy.model.path is None and cfg.value.model.path is None
    assert cfg.reference.model is None and cfg.reward.model is None
    assert cfg.tokenizer.kind == "bytes" and cfg.data.prompts == "builtin"
    from rlhf_ray.rewards.functions import load_reward_function

    assert callable(load_reward_function(cfg.reward.function))


ESTIMATOR_JOBS = {"grpo_cpu.yaml": "grpo", "rloo_cpu.yaml": "rloo",
                  "reinforce_pp_cpu.yaml": "reinforce_pp"}  # fmt: skip


@pytest.mark.parametrize(("name", "estimator"), ESTIMATOR_JOBS.items())
def test_estimator_jobs_run_the_cpu_system_without_a_critic(name: str, estimator: str):
    cfg, debug = _load(name), _load("debug_cpu.yaml")
    assert cfg.algo.estimator == estimator and cfg.rollout.samples_per_prompt == 4
    plan = resource_plan(cfg)
    assert [r.role for r in plan] == ["policy", "reference", "reward", "rollout"]
    assert sum(r.total_cpus for r in plan) <= 2 and sum(r.total_gpus for r in plan) == 0
    # the debug job's system otherwise: same policy group, pool and no-download sources
    assert cfg.policy.model_copy(update={"optim": debug.policy.optim}) == debug.policy
    assert cfg.rollout.num_workers == debug.rollout.num_workers
    assert (
        cfg.reward == debug.reward and cfg.data == debug.data and cfg.tokenizer == debug.tokenizer
    )
    assert (cfg.rollout.batch_size * 4) % cfg.ppo.minibatch_size == 0 and cfg.train.rounds <= 20
    # KL in exactly one place: grpo in the loss, the others in the reward
    assert (cfg.ppo.kl_in_loss is not None) == (estimator == "grpo")
    assert (cfg.ppo.kl_coef > 0) == (estimator != "grpo")


def test_plan_of_a_critic_free_job_shows_no_value_group():
    result = _plan("--config", "jobs/grpo_cpu.yaml")
    assert result.returncode == 0, result.stderr
    assert "no value group: algo.estimator grpo is critic-free" in result.stdout
    assert not any(line.startswith("value") for line in result.stdout.splitlines())
    debug = _plan("--config", "jobs/debug_cpu.yaml")
    assert any(line.startswith("value") for line in debug.stdout.splitlines())


@pytest.mark.parametrize("name", GPU_JOBS)
def test_gpu_jobs_are_realistic(name: str):
    cfg = _load(name)
    for role in resource_plan(cfg):
        assert role.gpus >= 1, f"{role.role} has no GPU"
    for learner in (cfg.policy, cfg.value):
        assert learner.engine == "deepspeed" and learner.zero_stage == 3
        assert learner.num_gpus_per_rank == 1
        assert learner.model.path and learner.model.dtype == "bfloat16"
    assert cfg.policy.optim.lr <= 1e-5
    # a reward model, not a rule: scored with the policy's own tokenizer
    assert cfg.reward.function is None and cfg.reward.model and cfg.reward.model.path
    assert cfg.tokenizer.kind == "hf" and cfg.tokenizer.name_or_path == cfg.policy.model.path
    assert cfg.data.format == "hh" and "hh-rlhf" in cfg.data.prompts
    assert (cfg.rollout.batch_size, cfg.ppo.minibatch_size) == (512, 64)
    assert (cfg.rollout.max_new_tokens, cfg.data.max_prompt_tokens) == (256, 512)


def test_8b_job_scales_up_the_1b_job():
    small, big = _load("ppo_1b_hh.yaml"), _load("ppo_8b_hh.yaml")
    assert big.policy.num_ranks > small.policy.num_ranks
    assert big.rollout.num_workers > small.rollout.num_workers
    gpus = {n: sum(r.total_gpus for r in resource_plan(c)) for n, c in (("1b", small), ("8b", big))}
    assert gpus["8b"] > gpus["1b"]
    assert gpus["1b"] <= 8  # right-sized with plan's memory estimate: one 8-GPU node
    assert sum(n.gpus * n.count for n in big.cluster.nodes) == 16  # 2 nodes x 8 GPUs


def test_plan_of_8b_job_fits_its_cluster():
    result = _plan("--config", "jobs/ppo_8b_hh.yaml")
    assert result.returncode == 0, result.stderr
    assert "fits cluster.nodes of the config" in result.stdout
    policy = next(line for line in result.stdout.splitlines() if line.startswith("policy"))
    assert 20 < float(policy.split()[6]) < 80  # estimated GB per policy GPU, under 80 GB


def test_plan_of_8b_job_on_one_gpu_names_the_gpu_shortfall():
    result = _plan(
        "--config", "jobs/ppo_8b_hh.yaml", "cluster.nodes=[{cpus: 8, gpus: 1, count: 1}]"
    )
    assert result.returncode == 1
    assert re.search(r"needs 16 GPUs, cluster has 1\b", result.stderr), result.stderr


# -- the runtime envs ---------------------------------------------------------------------------

MUST_EXCLUDE = ["runs/", ".venv/", "**/__pycache__/", ".pytest_cache/", ".git/"]


def _runtime_env(name: str) -> dict:
    return yaml.safe_load((JOBS / name).read_text())


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=lambda p: p.name)
def test_runtime_env_is_accepted_by_ray(path: Path):
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load(path.read_text())
    RuntimeEnv(**data)  # raises on unknown types, e.g. a non-string env var
    assert data["working_dir"] == "."
    assert "pip" not in data and "conda" not in data  # the image holds the dependencies
    assert set(MUST_EXCLUDE) <= set(data["excludes"])
    assert "HF_HUB_OFFLINE" not in data.get("env_vars", {})


def test_cpu_runtime_env_selects_deepspeed_on_cpu_and_gpu_one_does_not():
    assert _runtime_env("runtime_env_cpu.yaml")["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in _runtime_env("runtime_env.yaml").get("env_vars", {})


def _fake_checkout(root: Path) -> None:
    files = [
        "rlhf_ray/cli.py",
        "jobs/debug_cpu.yaml",
        "pyproject.toml",
        "runs/ppo-20250101-000000/metrics.jsonl",
        "runs/ppo-20250101-000000/policy/x.bin",
        ".venv/bin/python",
        "rlhf_ray/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".git/HEAD",
        ".mypy_cache/x.json",
        "rlhf_ray.egg-info/PKG-INFO",
    ]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")


def _packaged(directory: Path, target: Path, excludes: list[str], gitignore: bool) -> set[str]:
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    packaging.create_package(str(directory), target, include_gitignore=gitignore, excludes=excludes)
    with zipfile.ZipFile(target) as zf:
        return {n for n in zf.namelist() if not n.endswith("/")}


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env_cpu.yaml"])
def test_runtime_env_excludes_keep_runs_and_caches_out_of_the_upload(tmp_path, name):
    checkout = tmp_path / "checkout"
    _fake_checkout(checkout)
    excludes = _runtime_env(name)["excludes"]
    shipped = _packaged(checkout, tmp_path / "pkg.zip", excludes, gitignore=False)
    assert shipped == {"rlhf_ray/cli.py", "jobs/debug_cpu.yaml", "pyproject.toml"}


def test_rayignore_keeps_runs_and_caches_out_of_a_plain_working_dir_upload(tmp_path):
    checkout = tmp_path / "checkout"
    _fake_checkout(checkout)
    (checkout / ".rayignore").write_text((ROOT / ".rayignore").read_text())
    shipped = _packaged(checkout, tmp_path / "pkg.zip", [], gitignore=False)
    assert shipped == {"rlhf_ray/cli.py", "jobs/debug_cpu.yaml", "pyproject.toml", ".rayignore"}


def test_this_checkout_uploads_well_under_rays_working_dir_limit(tmp_path):
    target = tmp_path / "pkg.zip"
    shipped = _packaged(ROOT, target, _runtime_env("runtime_env.yaml")["excludes"], gitignore=True)
    assert {"rlhf_ray/cli.py", "jobs/ppo_1b_hh.yaml", "pyproject.toml"} <= shipped
    assert not any(
        n.startswith(("runs/", ".git/", ".venv/")) or "__pycache__" in n for n in shipped
    )
    assert target.stat().st_size < 100 * 2**20  # Ray refuses working dirs over 512 MiB


# -- the documented commands ----------------------------------------------------------------------


def _shell_commands(markdown: str) -> list[str]:
    """Commands of the ```bash blocks, with backslash continuations joined and comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _submit_commands() -> list[list[str]]:
    out = []
    for command in _shell_commands((JOBS / "README.md").read_text()):
        words = shlex.split(command)
        if words[:3] == ["ray", "job", "submit"]:
            out.append(words[3:])
    return out


def test_readme_documents_a_submit_command_for_every_job():
    submitted = set()
    for args in _submit_commands():
        entry = args[args.index("--") + 1 :]
        if entry[0] == "rlhf-ray" and entry[1] in ("ppo", *STAGE_LOADERS):
            submitted.add(Path(build_parser().parse_args(entry[1:]).config).name)
    assert {p.name for p in CONFIGS + STAGE_CONFIGS} <= submitted


@pytest.mark.parametrize("args", _submit_commands(), ids=lambda a: " ".join(a[-6:]))
def test_documented_submit_commands_are_valid(args: list[str]):
    from ray.dashboard.modules.job.cli import submit

    params = submit.make_context("submit", list(args)).params  # Ray's own flags
    assert params["address"], "pass the head explicitly: --address http://HEAD:8265"
    assert params["runtime_env"] and (ROOT / params["runtime_env"]).is_file()
    assert params["working_dir"] is None, "--working-dir would override the runtime env's"
    entry = list(params["entrypoint"])
    assert entry[0] == "rlhf-ray"
    parsed = build_parser().parse_args(entry[1:])
    assert (ROOT / parsed.config).is_file()
    if parsed.command in STAGE_LOADERS:
        stage = STAGE_LOADERS[parsed.command](ROOT / parsed.config, parsed.overrides)
        assert parsed.run_dir is not None and parsed.run_dir.is_absolute()
        gpus = stage.rollout.num_gpus_per_worker if parsed.command == "eval" else (
            stage.learner.num_gpus_per_rank)  # fmt: skip
        cpu_job = gpus == 0
        expected = "runtime_env_cpu.yaml" if cpu_job else "runtime_env.yaml"
        assert Path(params["runtime_env"]).name == expected
        return
    cfg = load_config(ROOT / parsed.config, parsed.overrides)
    if parsed.command == "ppo":
        assert parsed.run_dir is not None and parsed.run_dir.is_absolute()
        cpu_job = cfg.policy.num_gpus_per_rank == 0
        expected = "runtime_env_cpu.yaml" if cpu_job else "runtime_env.yaml"
        assert Path(params["runtime_env"]).name == expected


def test_readme_tells_token_auth_users_what_to_set():
    text = (JOBS / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN" in text
    assert "--run-dir" in text and "shared" in text


def test_scorer_replicas_are_planned_one_actor_each():
    """`reference.num_replicas` / `reward.num_replicas` actors ask for their resources each, so
    `plan` refuses a cluster they would not fit instead of leaving one pending."""
    cfg = load_config(None, ["reference.num_replicas=3", "reward.num_replicas=2",
                             "reward.num_gpus=1"])  # fmt: skip
    plan = {r.role: r for r in resource_plan(cfg)}
    assert (plan["reference"].actors, plan["reward"].actors) == (3, 2)
    assert plan["reward"].total_gpus == 2
