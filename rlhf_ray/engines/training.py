"""Training engines: DeepSpeed ZeRO (1/2/3) over torch.distributed, or plain torch AdamW.

Both expose the same small surface so the learners do not branch on the engine: ``module``,
``backward``, ``step``, ``all_reduce_sum``, ``full_state_dict`` and ``local_param_count``.
DeepSpeed is imported lazily: it is heavy and only learners need it.

Gradient accumulation: the caller calls ``backward`` then ``step`` once per micro-batch; the
optimizer steps (and ``step`` returns True) every ``accumulation`` micro-batches. Losses are
never divided by the accumulation count here: the caller scales each micro-batch's loss so
that the accumulated gradient is the one it wants (DeepSpeed's own 1/accumulation scaling is
turned off). The learning rate follows ``algo.schedule.lr_multiplier`` per optimizer step.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rlhf_ray.config.ppo import ZERO_BUCKETS_CPU


class OptimSource(Protocol):
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float


class LRSchedule:
    """``step -> LR factor`` of ``optim``'s schedule over ``total_steps`` optimizer steps
    (``decay_steps`` overrides them). A callable object rather than a closure: ``LambdaLR``
    saves and restores its fields with the scheduler's state, and ``respan`` can set its length
    once the learner knows it (a stage learns its data size after the engine is built)."""

    def __init__(self, optim: OptimSource, total_steps: int | None):
        self.kind = getattr(optim, "lr_schedule", "constant")
        self.warmup = getattr(optim, "warmup_steps", 0)
        self.min_ratio = getattr(optim, "min_lr_ratio", 0.0)
        self.decay_steps = getattr(optim, "decay_steps", None)
        self.total = self.decay_steps or total_steps or 1

    def __call__(self, step: int) -> float:
        from rlhf_ray.algo.schedule import lr_multiplier

        return lr_multiplier(step, self.warmup, self.total, self.kind, self.min_ratio)


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSource, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of ``optim``, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(optim, total_steps))


def respan(scheduler: torch.optim.lr_scheduler.LRScheduler, total_steps: int) -> None:
    """Make ``scheduler`` (made by ``make_scheduler``) span ``total_steps`` optimizer steps
    (unless ``decay_steps`` fixes its span), and set the current LR to match."""
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    schedules = [s for s in scheduler.lr_lambdas if isinstance(s, LRSchedule)]
    for schedule in schedules:
        schedule.total = schedule.decay_steps or total_steps
    groups = scheduler.optimizer.param_groups
    for group, base, schedule in zip(groups, scheduler.base_lrs, schedules, strict=True):
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def make_adamw(module: nn.Module, optim: OptimSource) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def changing_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, for a checkpoint: the whole state dict, or only the trainable
    parameters when some are frozen (LoRA: the base is rebuilt from its source on resume)."""
    state = module.state_dict()
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return state
    return {n: state[n] for n, p in module.named_parameters() if p.requires_grad}


def has_frozen(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


class TorchEngine:
    """One process, plain ``torch.optim.AdamW`` with global-norm clipping."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        module: nn.Module,
        optim: OptimSource,
        accumulation: int = 1,
        total_steps: int | None = None,
    ):
        self.module = module
        self.optimizer = make_adamw(module, optim)
        self.scheduler = make_scheduler(self.optimizer, optim, total_steps)
        self.grad_clip = optim.grad_clip
        self.accumulation = accumulation
        self.micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> bool | None:
        """End of a micro-batch. At an accumulation boundary: clip, and step unless the
        gradient norm is not finite; returns whether the step was applied. Between boundaries:
        None."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def respan(self, total_steps: int) -> None:
        """The LR schedule spans ``total_steps`` optimizer steps (see ``respan``)."""
        respan(self.scheduler, total_steps)

    def all_reduce_sum(self, value: float) -> float:
        return value

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        yield

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def local_param_count(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.module.parameters())
        return n, n

    def save_state(self, directory: str) -> None:
        """Weights and optimizer state, for an exact resume: tensors as safetensors, the rest
        as JSON (never a pickle)."""
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        optim = self.optimizer.state_dict()
        tensors = {f"module.{k}": v for k, v in changing_state(self.module).items()}
        scalars: dict[str, dict[str, Any]] = {}
        for index, per_param in optim["state"].items():
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        # tied weights share storage, which safetensors refuses: store each one as its own copy
        save_file(
            {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
            str(Path(directory) / "torch_engine.safetensors"),
        )
        meta = {
            "param_groups": optim["param_groups"],
            "scalars": scalars,
            "scheduler": self.scheduler.state_dict(),
        }
        (Path(directory) / "torch_engine.json").write_text(json.dumps(meta))

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(directory) / "torch_engine.safetensors"))
        meta = json.loads((Path(directory) / "torch_engine.json").read_text())
        module = {
            k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")
        }
        expected = set(changing_state(self.module))
        if set(module) != expected:  # a LoRA checkpoint holds exactly the trainable tensors
            raise KeyError(
                f"{directory}: the saved weights do not match the model's trainable tensors "
                f"(missing {sorted(expected - set(module))[:3]}, "
                f"unexpected {sorted(set(module) - expected)[:3]})"
            )
        self.module.load_state_dict(module, strict=not has_frozen(self.module))
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in meta["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if "scheduler" in meta:
            self.scheduler.load_state_dict(meta["scheduler"])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ("" for every address of this node): where rank 0
    hosts a process group's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: int, backend: str
) -> None:
    """Join the learner group's process group (all five variables must be set, or DeepSpeed tries MPI)."""
    import deepspeed

    from rlhf_ray.observe.quiet import quiet_dependencies, skip_shm_comm_op

    quiet_dependencies()
    if backend == "gloo":
        skip_shm_comm_op()
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def deepspeed_config(
    zero_stage: int,
    micro_batch: int,
    world_size: int,
    grad_clip: float,
    dtype: str,
    offload_optimizer: bool,
    accumulation: int = 1,
    offload_params: bool = False,
    buckets: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``buckets``: ``config.ZeroBuckets.resolve(...)`` (default: the CPU sizes); the memory
    estimate (``rlhf_ray.models.memory``) counts the same ones."""
    b = buckets or ZERO_BUCKETS_CPU
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "reduce_bucket_size": b["reduce"],
        "allgather_bucket_size": b["allgather"],
    }
    if zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = b["prefetch"]
        zero["stage3_max_live_parameters"] = b["max_live"]
        zero["stage3_max_reuse_distance"] = b["max_reuse_distance"]
        zero["sub_group_size"] = b["sub_group"]  # the optimizer steps a sub-group at a time
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def zero3_construction(config: dict[str, Any], enabled: bool = True) -> Iterator[None]:
    """Models built inside are partitioned as they are built (``deepspeed.zero.Init``, through
    transformers' DeepSpeed integration, which also makes ``from_pretrained`` load each shard
    into the partitions): no rank ever holds the whole model. ``rlhf_ray.models.build`` imports
    transformers' model classes inside its builders, so a class may be imported for the first
    time inside ``zero.Init``: with the transformers and DeepSpeed this project installs that
    works (a fresh learner process loading a GPT-2 directory under ZeRO-3 was checked), though
    older pairs failed there with a signature-mismatch TypeError."""
    if not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


class DeepSpeedEngine:
    """A DeepSpeed engine around ``module`` (the process group must already exist).

    ``config``: a ready ``deepspeed_config(...)`` (the one a ZeRO-3 model was constructed
    under); by default it is made from the other arguments.
    """

    def __init__(
        self,
        module: nn.Module,
        optim: OptimSource,
        zero_stage: int,
        micro_batch: int,
        dtype: str,
        offload_optimizer: bool,
        accumulation: int = 1,
        offload_params: bool = False,
        total_steps: int | None = None,
        config: dict[str, Any] | None = None,
    ):
        import deepspeed
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.zero_stage = zero_stage
        self.accumulation = accumulation
        config = config or deepspeed_config(
            zero_stage,
            micro_batch,
            self.world_size,
            optim.grad_clip,
            dtype,
            offload_optimizer,
            accumulation,
            offload_params,
        )
        optimizer = None if offload_optimizer else make_adamw(module, optim)
        if offload_optimizer:
            config["optimizer"] = {
                "type": "AdamW",
                "params": {
                    "lr": optim.lr,
                    "betas": list(optim.betas),
                    "eps": optim.eps,
                    "weight_decay": optim.weight_decay,
                },
            }
        factor = LRSchedule(optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
        self.module = self.engine.module
        # every tensor handed to torch.distributed lives here: NCCL groups (GPU learners) have
        # no backend for CPU tensors ("No backend type associated with device type cpu")
        self.device = torch.device(self.engine.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the caller scales micro-batch losses

    def respan(self, total_steps: int) -> None:
        """The LR schedule spans ``total_steps`` optimizer steps (see ``respan``)."""
        respan(self.scheduler, total_steps)

    def step(self) -> bool | None:
        """End of a micro-batch; DeepSpeed reduces and steps at its accumulation boundary.
        There it returns whether the step was applied (DeepSpeed skips one whose gradient norm
        is not finite under ZeRO-1/2, agreed over ranks, as it does an fp16 overflow); between
        boundaries None."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return bool(self.engine.was_step_applied()) if boundary else None

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def all_reduce_sum(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        """Collective on all ranks: inside, every rank sees the full parameters (ZeRO-3)."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=None, enabled=self.zero_stage == 3
        ):
            yield

    def whole_on_rank0(
        self, named: dict[str, torch.Tensor], to_cpu: bool = True
    ) -> dict[str, torch.Tensor] | None:
        """Collective on all ranks: rank 0 gets tensors of these whole parameters (and
        buffers), the others None: copies on the CPU, or with ``to_cpu`` False, on this rank's
        device (views of unpartitioned ones; a broadcast from GPU memory). Under ZeRO-3 each rank sends only its partition to rank 0
        (``torch.distributed.gather`` straight into the whole tensor's buffer), so no other
        rank receives the model and rank 0 holds one copy of it, not a gathered parameter and a
        copy. Only rank 0 needs the weights for a sync; an all-gather moves them N times."""
        import torch.distributed as dist

        out: dict[str, torch.Tensor] | None = {} if self.rank == 0 else None
        for name, tensor in named.items():
            part = getattr(tensor, "ds_tensor", None)
            if self.zero_stage != 3 or part is None:  # whole on every rank already
                if out is not None:
                    out[name] = tensor.detach().to("cpu", copy=True) if to_cpu else tensor.detach()
                continue
            # DeepSpeed's layout: rank r holds elements [r * n, (r + 1) * n) of the flattened,
            # padded parameter (n = the partition size, the same on every rank)
            part = part.detach().to(self.device)  # an offloaded partition sits on the CPU
            if out is None:
                dist.gather(part, dst=0)
                continue
            whole = torch.empty(
                part.numel() * self.world_size, dtype=part.dtype, device=part.device
            )
            dist.gather(part, gather_list=list(whole.chunk(self.world_size)), dst=0)
            zero3: Any = tensor  # DeepSpeed's attributes of a partitioned parameter
            whole = whole[: zero3.ds_numel].view(zero3.ds_shape)
            out[name] = whole.to("cpu") if to_cpu else whole
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective on all ranks; rank 0 gets the full weights, others None."""
        # keep_vars: ZeRO-3's parameters themselves (with their partitions), not empty tensors
        return self.whole_on_rank0(self.module.state_dict(keep_vars=True))

    def save_state(self, directory: str) -> None:
        """Collective: weights and each rank's (ZeRO-partitioned) optimizer state."""
        # LoRA: the frozen base is rebuilt from its source on resume; only what trains is saved
        frozen = has_frozen(self.module)
        self.engine.save_checkpoint(directory, tag="state", exclude_frozen_parameters=frozen)

    def load_state(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(
            directory,
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not has_frozen(self.module),  # (LoRA: the trainable ones saved)
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed training state under {directory}")

    def local_param_count(self) -> tuple[int, int]:
        """(parameters this rank holds, parameters of the whole model)."""
        local = total = 0
        for p in self.module.parameters():
            if hasattr(p, "ds_tensor"):
                local += p.ds_tensor.numel()
                total += p.ds_numel
            else:
                local += p.numel()
                total += p.numel()
        return local, total
