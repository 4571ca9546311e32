"""The cluster-facing files: docker/Dockerfile, .dockerignore and the cluster/ manifests.

No Docker engine, cloud or Kubernetes is needed: the Dockerfile is parsed, the cluster launcher
config is validated with the schema and checks that ship inside the ray package, and the KubeRay
manifests are checked for the structure the operator needs. Every cluster file must run the
image the Dockerfile builds and be able to hold the jobs of jobs/.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import ray
import yaml
from packaging.requirements import Requirement

from rlhf_ray.cli import build_parser
from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed.plan import Node, resource_plan, shortfalls

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CLUSTER = ROOT / "cluster"


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, args = (pending + stripped).partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _args(instructions, name: str) -> list[str]:
    return [args for word, args in instructions if word == name]


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for args in _args(instructions, "ARG"):
        key, _, value = args.partition("=")
        defaults[key] = value.strip('"')
    return defaults


def _expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def _image_tag() -> str:
    """The tag docker/Dockerfile says to build (`docker build -f docker/Dockerfile -t TAG .`)."""
    match = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "docker/Dockerfile does not document its build command"
    return match.group(1)


# -- docker/Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_starts_from_a_pinned_ray_gpu_image_of_our_ray_version(dockerfile):
    bases = _args(dockerfile, "FROM")
    assert len(bases) == 1
    image, _, tag = bases[0].split()[0].partition(":")
    assert image == "rayproject/ray"
    assert tag and "latest" not in tag and "nightly" not in tag
    # the cluster's Ray must be the Ray that submits to it
    assert tag.startswith(f"{ray.__version__}-"), (tag, ray.__version__)
    assert re.search(r"-(gpu|cu\d+)\b", tag), f"{tag} is not a CUDA image"
    python = re.search(r"-py3(\d+)", tag)
    assert python and int(python.group(1)) >= 10  # requires-python >= 3.10


def test_dockerfile_copies_and_installs_the_project(dockerfile):
    workdirs = _args(dockerfile, "WORKDIR")
    assert workdirs and workdirs[-1].startswith("/")
    copies = [shlex.split(a) for a in _args(dockerfile, "COPY")]
    copies = [[w for w in c if not w.startswith("--")] for c in copies]
    assert any(c[0] == "." and c[-1] in (workdirs[-1], ".", "./") for c in copies)
    installs = [shlex.split(r) for r in _args(dockerfile, "RUN") if "pip install" in r]
    project = [w for words in installs for w in words if w == "." or w.startswith(".[")]
    assert project, "no `pip install .` of the project"
    # the vLLM rollout backend is in the image, and nvcc for DeepSpeed's cpu_adam (8B offload)
    assert ".[vllm]" in project
    assert any("cuda-nvcc" in r for r in _args(dockerfile, "RUN"))
    assert any("CUDA_HOME=" in e for e in _args(dockerfile, "ENV"))


def test_dockerfile_torch_and_ray_pins_satisfy_the_project(dockerfile):
    runs = " ".join(_expand(r, _arg_defaults(dockerfile)) for r in _args(dockerfile, "RUN"))
    torch_pin = re.search(r"torch==([\w.]+)", runs)
    assert torch_pin, "torch is not pinned"
    requirements = {Requirement(r).name: Requirement(r) for r in _pyproject()["dependencies"]}
    assert requirements["torch"].specifier.contains(torch_pin.group(1))
    assert "download.pytorch.org/whl/cu" in runs  # a CUDA build, not PyPI's default wheel
    ray_pin = re.search(r"ray\[default\]==([\w.]+)", runs)
    assert ray_pin and ray_pin.group(1) == ray.__version__


def test_dockerfile_never_stops_ray():
    assert "ray stop" not in DOCKERFILE.read_text()


def test_documented_image_tag_is_the_project_version():
    name, _, version = _image_tag().rpartition(":")
    assert name.endswith("rlhf-ray") and version == _pyproject()["version"]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: `**` spans directories, `*` and `?` stay within one."""
    pattern = pattern.strip().strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Whether ``path`` (or a directory above it) is excluded from the build context."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_dockerignore_regex(p).match(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_runs_and_caches_out_but_the_project_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for junk in [
        "runs/ppo-1/metrics.jsonl",
        ".git/HEAD",
        ".venv/bin/python",
        "rlhf_ray/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/x",
    ]:
        assert _dockerignored(patterns, junk), junk
    for needed in [
        "pyproject.toml",
        "rlhf_ray/cli.py",
        "rlhf_ray/data/prompts.jsonl",
        "jobs/ppo_1b_hh.yaml",
        "docker/Dockerfile",
    ]:
        assert not _dockerignored(patterns, needed), needed


# -- cluster/ray-cluster.yaml (cluster launcher) --------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_launcher_config_passes_rays_own_validation(launcher):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))  # what `ray up` runs first


def test_launcher_runs_our_image_on_a_cpu_head_and_8_gpu_workers(launcher):
    assert launcher["docker"]["image"] == _image_tag()
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types)
    # the image holds everything: no per-node installs
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in launcher.get(key, [])), key


def _launcher_nodes(launcher: dict, workers: str) -> list[Node]:
    types = launcher["available_node_types"]
    nodes = []
    for name, spec in types.items():
        count = 1 if name == launcher["head_node_type"] else spec.get(workers, 0)
        res = spec["resources"]
        nodes += [Node(float(res.get("CPU", 0)), float(res.get("GPU", 0)))] * count
    return nodes


@pytest.mark.parametrize(
    ("job", "workers"), [("ppo_1b_hh.yaml", "min_workers"), ("ppo_8b_hh.yaml", "max_workers")]
)
def test_launcher_cluster_holds_the_gpu_jobs(launcher, job, workers):
    cfg = load_config(ROOT / "jobs" / job)
    assert shortfalls(resource_plan(cfg), _launcher_nodes(launcher, workers)) == []


# -- cluster/kuberay-*.yaml -----------------------------------------------------------------------


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _k8s_nodes(spec: dict, replicas: str) -> list[Node]:
    """The Ray nodes a RayCluster spec gives, as rlhf-ray's plan sees them."""
    head = spec["headGroupSpec"]
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    head_cpus = _quantity(head["rayStartParams"].get("num-cpus", head_limits["cpu"]))
    nodes = [Node(head_cpus, _quantity(head_limits.get("nvidia.com/gpu", 0)))]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        node = Node(_quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0)))
        nodes += [node] * group[replicas]
    return nodes


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"] == _image_tag()
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/mnt/shared" in mounts and "/dev/shm" in mounts
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        if "nvidia.com/gpu" in resources.get("limits", {}):
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
            gpu_groups.append(_quantity(resources["limits"]["nvidia.com/gpu"]))
    assert gpu_groups and all(g == 8 for g in gpu_groups)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def test_kuberay_raycluster_structure(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    _check_cluster_spec(raycluster["spec"])


@pytest.mark.parametrize(
    ("job", "replicas"), [("ppo_1b_hh.yaml", "replicas"), ("ppo_8b_hh.yaml", "maxReplicas")]
)
def test_kuberay_raycluster_holds_the_gpu_jobs(raycluster, job, replicas):
    cfg = load_config(ROOT / "jobs" / job)
    assert shortfalls(resource_plan(cfg), _k8s_nodes(raycluster["spec"], replicas)) == []


def test_kuberay_rayjob_runs_rlhf_ray_from_the_image(rayjob, dockerfile):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["rlhf-ray", "ppo"]
    args = build_parser().parse_args(words[1:])
    # the config is read from the project copy the image holds (WORKDIR of the Dockerfile)
    workdir = PurePosixPath(_args(dockerfile, "WORKDIR")[-1])
    config = PurePosixPath(str(args.config))
    if config.is_absolute():
        config = config.relative_to(workdir)
    assert config == PurePosixPath("jobs/ppo_1b_hh.yaml")
    cfg = load_config(ROOT / config, args.overrides)
    # the run dir is on the volume every pod mounts
    assert args.run_dir and PurePosixPath(str(args.run_dir)).is_relative_to("/mnt/shared")
    yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    _check_cluster_spec(spec["rayClusterSpec"])
    nodes = _k8s_nodes(spec["rayClusterSpec"], "replicas")
    assert shortfalls(resource_plan(cfg), nodes) == []


def test_docker_build_context_installs_the_package(tmp_path):
    """What `COPY . ` puts in the image (the repository minus .dockerignore) is enough for the
    Dockerfile's `pip install .`: build the wheel from exactly that context and check it
    carries the package, its bundled prompts and the console script."""
    import subprocess
    import sys
    import zipfile

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = tracked.stdout.split() if tracked.returncode == 0 else []
    if not files:
        pytest.skip("not a git checkout")
    context = tmp_path / "context"
    for name in files:
        if not _dockerignored(patterns, name) and (ROOT / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            (context / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("rlhf_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlhf_ray/ppo/loop.py" in names and "rlhf_ray/data/prompts.jsonl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rlhf-ray = rlhf_ray.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
