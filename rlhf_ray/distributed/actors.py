"""Actor helpers shared by every Ray-backed set of workers: spawn a named actor with its
resources and accelerator (``spawn_actor``), spread actors over nodes (``spread_strategy``),
wait until actors are ready (``wait_ready``), gather a phase's results failing fast
(``get_all``), and kill actors quietly (``kill_actors``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from rlhf_ray.accelerator import actor_env
from rlhf_ray.config.ppo import (
    Config,
)
from rlhf_ray.config.stages import EvalConfig
from rlhf_ray.errors import UserError
from rlhf_ray.workers.interface import (
    LearnerLostError,
)


def share_threads(cpus: float) -> int:
    """An actor's torch threads at start: its CPU share (measured: 2 actors x 2 threads on 2
    cores ran ~5x slower than 2 x 1). ``threads.py`` resizes them per phase."""
    return max(1, int(cpus))


def _env(cpus: float, gpus: float) -> dict[str, Any]:
    env: dict[str, str] = actor_env(gpus)  # the accelerator, explicit (rlhf_ray/accelerator.py)
    env["OMP_NUM_THREADS"] = str(share_threads(cpus))
    return {"env_vars": env}


def kill_actors(handles: list[Any], timeout_s: float = 30.0) -> None:
    """Kill actors and wait until Ray has released them (and so their names).

    Death is confirmed by a ``ping`` sent without retries: a scorer is started with
    ``max_task_retries`` (Ray retries its calls across restarts), and a retried ping of a
    killed actor is what Ray reports as "Task ... failed ... killed by `ray.kill`". Every ping
    is fetched, since one dropped unfetched is printed as an unhandled error too."""
    for h in handles:
        ray.kill(h)
    deadline = time.monotonic() + timeout_s
    for h in handles:
        ping, patience = _ping_once(h), time.monotonic() + 5.0
        while time.monotonic() < min(deadline, patience):
            try:
                ray.get(ping, timeout=1)
            except ray.exceptions.GetTimeoutError:
                continue  # the same ping, waited on again (an unreachable actor: 5 s at most)
            except ray.exceptions.RayActorError:
                break  # dead (or unreachable, ActorUnavailableError is a RayActorError)
            time.sleep(0.1)  # answered before the kill took effect: ask again
            ping = _ping_once(h)


def _ping_once(handle: Any) -> Any:
    return handle.ping.options(max_task_retries=0).remote()


def check_namespace_free() -> None:
    """Actor names are unique per namespace: say so clearly if another run holds them."""
    try:
        ray.get_actor("policy-0")
    except ValueError:
        return
    namespace = ray.get_runtime_context().namespace
    raise UserError(
        f"another run's actors (policy-0, ...) are alive in Ray namespace {namespace!r} of this "
        "cluster: wait for that run to end, or give this one its own cluster.namespace"
    )


class PhaseTimeoutError(UserError):
    """Some actors of a phase did not answer within ``train.phase_timeout_s``."""


PEER_GRACE_S = 15.0  # how long a failed collective's peers are given to show a dead rank


def dead_peer(refs: list[Any], names: list[str], grace_s: float = PEER_GRACE_S) -> str | None:
    """After one rank's call failed inside its actor, the name of a rank among ``refs`` whose
    call shows that its actor died, waiting at most ``grace_s``; None if none does. A killed
    rank's peers fail in their collective ("Connection reset by peer") and that error can
    arrive before Ray reports the death itself."""
    deadline, pending = time.monotonic() + grace_s, list(refs)
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return names[refs.index(ref)]
            except ray.exceptions.RayError:
                continue  # another peer's failed collective
    return None


def _is_learner(name: str) -> bool:
    return name.startswith(("policy-", "value-"))


def get_all(
    refs: list[Any],
    names: list[str] | None = None,
    phase: str = "",
    timeout_s: float | None = None,
    on_timeout: Callable[[list[str]], bool] | None = None,
    resubmit: Callable[[str], Any] | None = None,
) -> list[Any]:
    """``ray.get`` of one phase that fails as soon as any call fails: the peers of a dead
    learner rank would otherwise be waited on until the collective timeout.

    Waits at most ``timeout_s`` (between answers of a late actor's restarts): past it,
    ``on_timeout(late names)`` may restart them and return True to wait again; otherwise a
    late learner raises ``LearnerLostError``, anything else ``PhaseTimeoutError``. A dead
    learner (``names`` given) raises ``LearnerLostError`` naming it and the phase; the call of
    another dead or unreachable actor is sent again if ``resubmit(name)`` gives a new ref. A
    learner whose call failed because a peer rank died (``dead_peer``) raises
    ``LearnerLostError`` naming the dead rank."""
    refs = list(refs)
    label = dict(zip(refs, names or [""] * len(refs), strict=True))
    slot = {r: i for i, r in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            late = [label[r] for r in pending]
            if on_timeout is not None and on_timeout(late):
                deadline = time.monotonic() + (timeout_s or 0.0)
                continue
            raise_late(late, phase, timeout_s)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError:  # also ActorUnavailableError (a lost node)
            name = label[ready[0]]
            if _is_learner(name):
                raise LearnerLostError(f"learner {name} died during {phase}") from None
            again = resubmit(name) if resubmit is not None else None
            if again is None:
                raise
            refs[slot[ready[0]]] = again
            label[again], slot[again] = name, slot[ready[0]]
            pending.append(again)
        except ray.exceptions.RayTaskError:
            name = label[ready[0]]
            peers = [r for r in pending if _is_learner(label[r])]
            dead = dead_peer(peers, [label[r] for r in peers]) if _is_learner(name) else None
            if dead is None:
                raise
            raise LearnerLostError(
                f"learner {dead} died during {phase} ({name} failed in a collective with it)"
            ) from None
    return ray.get(refs)


def raise_late(late: list[str], phase: str, timeout_s: float | None) -> None:
    named = ", ".join(n or "an actor" for n in late)
    message = f"{named} did not answer within train.phase_timeout_s={timeout_s:g}s during {phase}"
    if any(_is_learner(n) for n in late):
        raise LearnerLostError(message)
    raise PhaseTimeoutError(message)


class PlacementTimeoutError(UserError):
    """Actors stayed pending past ``cluster.actor_start_timeout_s``: no node could take them."""


def wait_ready(handles: dict[str, Any], timeout_s: float) -> None:
    """Wait until every named actor answers ``ping``; a clear error
    (``PlacementTimeoutError``) if some stay pending."""
    refs = {h.ping.remote(): name for name, h in handles.items()}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)  # surface constructor errors
    if pending:
        names = ", ".join(refs[r] for r in pending)
        raise PlacementTimeoutError(
            f"actors still pending after {timeout_s:g}s (cluster.actor_start_timeout_s): {names}. "
            "The cluster cannot schedule them; check `rlhf-ray plan` and the Ray dashboard."
        )


def spawn_actor(
    cls: type,
    name: str,
    cpus: float,
    gpus: float,
    *args: Any,
    restarts: int = 0,
    strategy: Any = None,
    **kwargs: Any,
) -> Any:
    """A named actor of ``cls`` with its resources and at most its CPU share of threads;
    ``restarts`` > 0 lets Ray restart it and retry its calls (stateless scorers only);
    ``strategy`` places it (a placement-group bundle)."""
    return (
        ray.remote(cls)
        .options(
            name=name,
            num_cpus=cpus,
            num_gpus=gpus,
            runtime_env=_env(cpus, gpus),
            max_restarts=restarts,
            max_task_retries=restarts,
            scheduling_strategy=strategy,
        )
        .remote(*args, num_threads=share_threads(cpus), **kwargs)
    )


def spread_strategy(cfg: Config | EvalConfig) -> str | None:
    """Rollout workers and scorers spread over nodes: a lost node takes few of them."""
    return "SPREAD" if cfg.cluster.spread else None
