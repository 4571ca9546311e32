"""``Learner``: one data-parallel rank training one model with one engine on one objective.

Every trained model of rlhf_ray is trained here: PPO's policy and critic
(``workers.learners``), the SFT model and the reward model (``workers.stage_learners``). They
differ only in their ``workers.objectives`` objective and in how data reaches ``step``, the ONE
minibatch step: micro-batch accumulation, the non-finite skip, gradient checkpointing, ZeRO
and its offloads and the LR schedule behave the same in every stage.

Rows: every rank receives the whole batch (a PPO round's, or a stage's train set) and takes its
contiguous share of each minibatch's rows, which come from a permutation seeded by (seed, round)
in PPO and (seed, epoch) in a stage, identical on every rank. Each micro-batch's loss is
weighted by its share of the GLOBAL minibatch's units (tokens, sequences or pairs): ranks'
gradients are averaged and micro-batches' add up, so 1 rank, N ranks, ZeRO-1/2/3 and any
micro-batch size take the same optimizer steps (up to float rounding). Stats are weighted the
same way: their mean over ranks is the figure of the global minibatch. A stage drops the last
partial batch of an epoch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.accelerator import check_deepspeed_accelerator
from rlhf_ray.config.roles import is_adapter_dir
from rlhf_ray.engines.training import (
    DeepSpeedEngine,
    TorchEngine,
    deepspeed_config,
    free_port,
    init_distributed,
    zero3_construction,
)
from rlhf_ray.errors import UserError
from rlhf_ray.models import default_device
from rlhf_ray.models.lora import adapter_tensors, export_lora, is_lora
from rlhf_ray.models.weights import (
    NumpyWeights,
    full_nbytes,
    plan_buckets,
    state_dict_to_numpy,
    weight_tensors,
)
from rlhf_ray.types import Rows
from rlhf_ray.workers.collective import BucketSender, SyncGroup, host_store
from rlhf_ray.workers.objectives import Objective
from rlhf_ray.workers.shared_slot import layout
from rlhf_ray.workers.threads import PhaseThreads, set_threads

BucketTensors = dict[str, torch.Tensor] | None


class NonFiniteLossError(UserError):
    """``max_bad_steps`` updates in a row had a non-finite loss or gradient."""


class Learner(PhaseThreads):
    """One rank of a learner group: an engine around a model, trained on ``objective``."""

    def __init__(
        self,
        learner_cfg,
        model,
        optim,
        build: Callable[[], torch.nn.Module],
        objective: Objective,
        minibatch: int,
        micro_batch: int | None = None,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        max_bad_steps: int = 3,
        total_steps: int | None = None,
        idle_rounds: int = 0,
        target_kl: float | None = None,
    ):
        """``learner_cfg``: a ``config.LearnerConfig``; ``model``, ``optim``: the
        ``ModelSpec`` that ``build()`` builds and its ``OptimSpec``. ``minibatch``: global rows
        per optimizer step; ``micro_batch``: rows per forward/backward on a rank (default:
        the rank's whole share). ``epochs``: passes over the data given (a PPO round's batch,
        a stage's train set). ``total_steps``: optimizer steps the LR schedule spans (default:
        a stage's, counted when its data arrives). ``idle_rounds``: PPO rounds that
        ``train`` skips (the policy during ``ppo.critic_warmup_rounds``). ``target_kl``: stop a
        round's epochs early once a minibatch's ``approx_kl`` stat passes it (``train``)."""
        set_threads(num_threads)
        self.cfg, self.model_spec, self.optim = learner_cfg, model, optim
        self.engine_name = learner_cfg.engine_for(world_size, model.dtype)  # (auto resolved)
        self.objective = objective
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.minibatch, self.epochs = minibatch, epochs
        share = minibatch // world_size
        self.micro_batch = micro_batch or share
        self.accumulation = share // self.micro_batch
        self.score_batch = learner_cfg.score_micro_batch_size
        self.total_steps, self.idle_rounds = total_steps, idle_rounds
        self.target_kl = target_kl
        self.span = total_steps  # what the LR schedule spans in this run (None: not known yet)
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0  # non-finite updates in a row (the same on every rank)
        self._build = build
        self.engine: TorchEngine | DeepSpeedEngine | None = None
        self.data: dict[str, Rows] = {}  # a stage's "train" and "eval" sets
        # (bucket_mb, names per bucket, bytes of the largest in the sync group's shared slot)
        self._buckets: tuple[float, list[list[str]], int] | None = None
        self._sync_store: tuple[Any, int] | None = None  # rank 0: the sync group's rendezvous
        self._sender: BucketSender | None = None

    # -- the engine ---------------------------------------------------------------------------

    def free_port(self) -> int:
        """A port free on this rank's node now (rank 0's hosts the group's rendezvous)."""
        return free_port(host="")

    def init_process_group(
        self, master_addr: str, master_port: int, timeout_s: int, backend: str = "gloo"
    ) -> None:
        init_distributed(self.rank, self.world_size, master_addr, master_port, timeout_s, backend)

    def setup(self) -> tuple[int, int]:
        """Build the model and engine; returns (parameters held here, parameters in all).

        Under ZeRO-3 a model loaded from a path is partitioned while it is loaded
        (``zero3_construction``): no rank ever holds all of it. A preset (tiny, random) is
        built whole, then partitioned (transformers' ZeRO-3 init would not reproduce its
        seeded random weights)."""
        self.device = default_device()
        cfg, dtype = self.cfg, self.model_spec.dtype
        if self.engine_name == "torch":
            module = self._build().to(self.device)
            self._prepare(module)
            self.engine = TorchEngine(module, self.optim, self.accumulation, self.total_steps)
            return self.engine.local_param_count()
        import torch.distributed as dist

        check_deepspeed_accelerator(self.device)
        config = deepspeed_config(
            cfg.zero_stage,
            self.micro_batch,
            dist.get_world_size(),
            self.optim.grad_clip,
            dtype,
            cfg.offload_optimizer,
            self.accumulation,
            cfg.offload_params,
            cfg.zero_buckets.resolve(on_gpu=self.device.type != "cpu"),
        )
        path = self.model_spec.path  # (an adapter merged at the start is merged whole)
        merged = is_adapter_dir(path) and self.model_spec.merge_adapter
        zero_init = cfg.zero_stage == 3 and path is not None and not merged
        with zero3_construction(config, enabled=zero_init):
            module = self._build()
        if not zero_init:
            module = module.to(self.device)
        self._prepare(module)
        self.engine = DeepSpeedEngine(
            module,
            self.optim,
            cfg.zero_stage,
            self.micro_batch,
            dtype,
            cfg.offload_optimizer,
            total_steps=self.total_steps,
            config=config,
        )
        return self.engine.local_param_count()

    def _prepare(self, module: torch.nn.Module) -> None:
        module.train()
        if self.cfg.gradient_checkpointing:
            hf: Any = getattr(module, "seq_cls", module)  # ScalarHeadModel wraps the HF model
            kwargs = {"use_reentrant": False}  # reentrant checkpoints lose grads of frozen inputs
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if is_lora(module):  # frozen embeddings: let the checkpointed layers' input need grad
                hf.enable_input_require_grads()

    @property
    def lora(self) -> bool:
        """Whether this learner trains LoRA adapters (its model is a peft model)."""
        return self.engine is not None and is_lora(self.module)

    @property
    def module(self) -> Any:  # the (DeepSpeed-wrapped) HF model
        assert self.engine is not None, "call setup() first"
        return self.engine.module

    def my_rows(self, n: int) -> slice:
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    # -- the one minibatch step ---------------------------------------------------------------

    def step(self, data: Rows, rows: torch.Tensor, where: str) -> tuple[dict[str, float], bool]:
        """One optimizer step on the global minibatch ``rows`` of ``data``: this rank's share,
        as ``accumulation`` micro-batches. Returns this rank's unit-weighted stats (their mean
        over ranks is the global minibatch's) and whether the step was applied: it is not when
        a micro-batch's loss is non-finite on some rank (agreed by one all-reduce, so every rank
        does the same) or the engine skipped it for a non-finite gradient. ``max_bad_steps``
        such steps in a row raise ``NonFiniteLossError`` (``where``: the round or epoch).

        A non-finite micro-batch skips its whole step, never just itself: every micro-batch
        still runs its backward (ZeRO reduces gradients there, at the accumulation boundary
        too, so ranks stay in step), but from the first non-finite one on the loss is scaled by
        NaN on every rank, which makes every gradient it reaches NaN. The engine's own
        non-finite-gradient check then skips the step (DeepSpeed agrees on it over ranks under
        ZeRO-1/2/3), and the step is counted once as skipped."""
        assert self.engine is not None, "call setup() first"
        mine = rows[self.my_rows(len(rows))]
        total = self.objective.units(data.select(rows))
        stats: dict[str, float] = defaultdict(float)
        clean, applied = True, None
        for first in range(0, len(mine), self.micro_batch):
            mb = data.select(mine[first : first + self.micro_batch]).to(self.device)
            loss, parts = self.objective.loss(self.module, mb)
            weight = self.objective.units(mb) * self.world_size / total
            for key, value in {"loss": loss, **parts}.items():
                stats[key] += float(torch.as_tensor(value).detach()) * weight
            clean = self._finite_everywhere(loss) and clean
            self.engine.backward(loss * (weight if clean else float("nan")))
            applied = self.engine.step()
            last = first + self.micro_batch >= len(mine)
            if (applied is not None) != last:
                raise RuntimeError(
                    "engine and learner disagree on the accumulation boundary (micro-batch "
                    f"ending at row {first + self.micro_batch} of {len(mine)}, engine at a "
                    f"boundary: {applied is not None})"
                )
        if not clean and applied:
            raise RuntimeError("the engine applied a step whose gradient was made non-finite")
        ok = bool(applied)
        self._count_bad(ok, where)
        return dict(stats), ok

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one all-reduce: all ranks decide alike)."""
        assert self.engine is not None
        bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
        return self.engine.all_reduce_sum(bad) == 0.0

    def _count_bad(self, ok: bool, where: str) -> None:
        self.bad_in_row = 0 if ok else self.bad_in_row + 1
        if self.bad_in_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"the {self.objective.name} learner: {self.bad_in_row} updates in a row had a "
                f"non-finite loss or gradient ({where}; train.max_bad_steps="
                f"{self.max_bad_steps}); the run stops rather than train on them. Lower the "
                "learning rate, check the data or rewards, or resume from the last checkpoint."
            )

    # -- PPO: epochs over a round's batch -----------------------------------------------------

    def train(self, batch: Rows, round_index: int) -> dict[str, float]:
        """``epochs`` passes over a PPO round's batch in minibatches; no step (and no stats) in
        the first ``idle_rounds`` rounds. Stats are the applied steps' means, keyed
        ``{name}_loss``, ``{name}_lr`` (the next step's) and ``{name}_skipped_steps``.

        With ``target_kl``, KL early stopping (Stable-Baselines3's, at the minibatch): after each
        step the minibatch's ``approx_kl`` (measured in its forward, so it holds the updates
        before it) is averaged over ranks by one all-reduce, so every rank makes the same
        decision; once it passes ``target_kl`` the rest of the round's minibatches, in every
        epoch, are skipped. The passing minibatch's own step is kept: its gradient is already
        accumulated over its micro-batches (SB3, with one forward per minibatch, drops it).
        Stats add ``early_stopped`` (1/0), ``early_stop_epoch`` and ``early_stop_minibatch``
        (0-based; -1 when it ran to the end) and ``early_stop_kl`` (the KL that passed; 0)."""
        if round_index < self.idle_rounds:
            return {}
        n, size = len(batch), self.minibatch
        gen = torch.Generator().manual_seed(self.seed * 7919 + round_index)
        sums: dict[str, float] = defaultdict(float)
        steps = skipped = 0
        stop: tuple[int, int, float] | None = None  # (epoch, minibatch, KL) it stopped at
        for epoch in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            for minibatch, start in enumerate(range(0, n, size)):
                stats, ok = self.step(batch, perm[start : start + size], f"round {round_index}")
                steps, skipped = steps + ok, skipped + (not ok)
                for key, value in stats.items() if ok else ():
                    sums[key] += value
                kl = self._kl_past_target(stats)
                if kl is not None:
                    stop = (epoch, minibatch, kl)
                    break
            if stop is not None:
                break
        out = {k: v / steps for k, v in sums.items()} if steps else {"loss": float("nan")}
        name = self.objective.name
        out[f"{name}_loss"] = out.pop("loss")
        out[f"{name}_lr"] = self.engine.lr()  # type: ignore[union-attr]
        out[f"{name}_skipped_steps"] = float(skipped)
        if self.target_kl is not None:
            epoch, minibatch, kl = stop if stop is not None else (-1, -1, 0.0)
            out["early_stopped"] = float(stop is not None)
            out["early_stop_epoch"], out["early_stop_minibatch"] = float(epoch), float(minibatch)
            out["early_stop_kl"] = kl
        return out

    def _kl_past_target(self, stats: dict[str, float]) -> float | None:
        """The minibatch's approx KL over all ranks (one all-reduce: every rank decides alike)
        when it passes ``target_kl``, else None (also without a target)."""
        if self.target_kl is None:
            return None
        assert self.engine is not None
        kl = self.engine.all_reduce_sum(stats.get("approx_kl", 0.0)) / self.world_size
        return kl if kl > self.target_kl else None

    # -- a stage: a train set held here, one step per driver call -----------------------------

    def load_data(self, train: Rows, eval_set: Rows | None = None) -> int:
        """Hold a stage's train (and eval) set; the LR schedule spans all its steps."""
        assert self.engine is not None, "call setup() first"
        self.data = {"train": train} if eval_set is None else {"train": train, "eval": eval_set}
        if self.total_steps is None:
            self.span = self.epochs * (len(train) // self.minibatch)
            self.engine.respan(self.span)
        return len(train)

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        """Optimizer step ``step`` of epoch ``epoch`` of a stage: rows
        ``perm_e[step*B : (step+1)*B]`` of a permutation seeded by (seed, epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(len(self.data["train"]), generator=gen)
        rows = perm[step * self.minibatch : (step + 1) * self.minibatch]
        stats, ok = self.step(self.data["train"], rows, f"epoch {epoch}, step {step}")
        return {**stats, "skipped_steps": 0.0 if ok else 1.0}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """The loss and stats over the whole ``split`` ("train" or "eval"), unit-weighted.
        Every rank scores the whole split (identical forwards keep ZeRO-3's gathers in step)."""
        data = self.data[split]
        sums: dict[str, float] = defaultdict(float)
        count = 0.0
        for start in range(0, len(data), self.score_batch):
            part = data.select(slice(start, start + self.score_batch)).to(self.device)
            loss, stats = self.objective.loss(self.module, part)
            weight = self.objective.units(part)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] += float(v) * weight
            count += weight
        return {k: v / count for k, v in sums.items()}

    # -- weights out and state ----------------------------------------------------------------

    def _sync_tensors(self) -> dict[str, torch.Tensor]:
        """What a sync sends: the adapters alone with LoRA (the workers hold the base), else
        every weight."""
        return adapter_tensors(self.module) if self.lora else weight_tensors(self.module)

    def sync_nbytes(self) -> tuple[int, int]:
        """(bytes a sync sends, bytes of every weight): equal unless LoRA sends adapters."""
        sent = sum(full_nbytes(t) for t in self._sync_tensors().values())
        return sent, sum(full_nbytes(t) for t in weight_tensors(self.module).values())

    def _bucket_plan(self, bucket_mb: float) -> tuple[float, list[list[str]], int]:
        if self._buckets is None or self._buckets[0] != bucket_mb:
            tensors = list(self._sync_tensors().items())
            sizes = [full_nbytes(t) for _, t in tensors]
            groups = plan_buckets(sizes, int(bucket_mb * 2**20))
            slot = max((layout([sizes[i] for i in g])[1] for g in groups), default=0)
            self._buckets = (bucket_mb, [[tensors[i][0] for i in g] for g in groups], slot)
        return self._buckets

    def _bucket_names(self, bucket_mb: float) -> list[list[str]]:
        return self._bucket_plan(bucket_mb)[1]

    def num_weight_buckets(self, bucket_mb: float) -> int:
        """How many buckets of about ``bucket_mb`` MB the weights travel in."""
        return len(self._bucket_names(bucket_mb))

    def _bucket_tensors(self, index: int, bucket_mb: float, host: bool) -> BucketTensors:
        """Collective on all ranks (ZeRO-3 gathers only bucket ``index``'s tensors); rank 0
        gets ``{name: whole tensor}``, on the host if ``host`` (else where they live: on CPU
        and unpartitioned, views of the live parameters), the others None."""
        assert self.engine is not None, "call setup() first"
        tensors = self._sync_tensors()
        names = self._bucket_names(bucket_mb)[index]
        if getattr(self.engine, "zero_stage", 0) == 3:  # the partitions are sent to rank 0
            assert isinstance(self.engine, DeepSpeedEngine)
            return self.engine.whole_on_rank0({n: tensors[n] for n in names}, to_cpu=host)
        if self.rank != 0:
            return None
        bucket = {n: tensors[n].detach() for n in names}
        if host and self.device.type != "cpu":
            bucket = {n: t.to("cpu", copy=True) for n, t in bucket.items()}
        return bucket

    def weight_bucket(self, index: int, bucket_mb: float) -> NumpyWeights | None:
        """Collective on all ranks (ZeRO-3 gathers only this bucket's tensors); rank 0 returns
        bucket ``index`` as numpy arrays, the others None."""
        # on CPU the arrays view the live parameters: Ray copies them into the object store
        bucket = self._bucket_tensors(index, bucket_mb, host=True)
        return None if bucket is None else state_dict_to_numpy(bucket)

    # -- the weight-sync group (sync.transport: collective; workers/collective.py) -----------

    def sync_store(self, timeout_s: float) -> int:
        """Rank 0 hosts the weight-sync group's rendezvous (once); returns its port."""
        if self._sync_store is None:
            self._sync_store = host_store(timeout_s)
        return self._sync_store[1]

    def join_sync_group(
        self,
        address: str,
        port: int,
        tag: str,
        world_size: int,
        timeout_s: float,
        backend: str,
        shared_memory: bool = True,
    ) -> None:
        """Rank 0 joins formation ``tag`` of the weight-sync group as its rank 0 (and offers
        its shared slot to the members on its host when ``shared_memory``)."""
        assert self._sync_store is not None, "call sync_store() first"
        if self._sender is not None:
            self._sender.group.close()  # the last formation's slot
            self._sender = None
        store = self._sync_store[0]
        args = (address, port, tag, 0, world_size, timeout_s, backend, store, shared_memory)
        self._sender = BucketSender(SyncGroup(*args))

    def send_bucket(self, index: int, bucket_mb: float) -> None:
        """Collective on all ranks (the ZeRO-3 gather); rank 0 starts broadcasting bucket
        ``index`` to the sync group once the previous bucket's broadcast is done."""
        on_host = self._sender is None or self._sender.group.needs_host_tensors
        bucket = self._bucket_tensors(index, bucket_mb, host=on_host)
        if bucket is not None and self._sender is not None:
            # the slot is sized once to the largest bucket: a sync never grows it midway
            self._sender.send(bucket, reserve=self._bucket_plan(bucket_mb)[2])

    def finish_send(self) -> int:
        """Rank 0: wait for the last broadcast; the bytes sent, or the ``WeightSyncError``."""
        assert self._sender is not None, "join the sync group first"
        return self._sender.finish()

    def full_weights(self) -> NumpyWeights | None:
        """Collective on all ranks; rank 0 returns the full weights as numpy arrays."""
        assert self.engine is not None, "call setup() first"
        state = self.engine.full_state_dict()
        return None if state is None else state_dict_to_numpy(state)

    def save(self, directory: str, merged: bool = True) -> None:
        """Collective; rank 0 writes the full model in Hugging Face format (no progress bar).
        A LoRA learner writes its adapter to ``directory/adapter`` (a PEFT adapter directory)
        and, when ``merged``, the merged model to ``directory`` (a plain model)."""
        from transformers.utils import logging as hf_logging

        assert self.engine is not None, "call setup() first"
        state = self.engine.full_state_dict()
        if state is None:
            return
        hf_logging.disable_progress_bar()
        Path(directory).mkdir(parents=True, exist_ok=True)
        if self.lora:
            export_lora(self.module, state, directory, self.model_spec, merged)
        else:
            self.module.save_pretrained(directory, state_dict=state)

    def save_state(self, directory: str) -> None:
        """Collective: everything this group needs to resume training exactly."""
        assert self.engine is not None, "call setup() first"
        self.engine.save_state(directory)

    def load_state(self, directory: str) -> None:
        """Resume training from ``save_state``'s directory. The LR schedule keeps its step but
        spans THIS run's optimizer steps: the saved state holds the saved run's span, and a
        resumed run may train more rounds or epochs (``load_data`` before or after)."""
        assert self.engine is not None, "call setup() first"
        self.engine.load_state(directory)
        if self.span is not None:
            self.engine.respan(self.span)

    def ping(self) -> int:
        return self.rank
