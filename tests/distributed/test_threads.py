"""How a phase's actors split the CPUs the run holds on their node (``distributed/threads.py``),
worked out by hand."""

from __future__ import annotations

from rlhf_ray.distributed.threads import phase_threads


def test_an_actor_alone_in_its_phase_gets_every_cpu_the_run_holds_on_its_node():
    # the update of jobs/arithmetic_cpu.yaml: policy 1 + reference 0.25 + reward 0.25 +
    # rollout 0.5 = 2 CPUs held; only the policy works
    assert phase_threads({"policy": ("a", 1.0)}, {"a": 2.0}) == {"policy": 2}
    assert phase_threads({"rollout": ("a", 0.5)}, {"a": 2.0}) == {"rollout": 2}


def test_actors_working_at_once_split_the_node_by_share_rounded_down_and_never_below_one():
    # the score phase: 2 x 1 / 1.5 = 1.33 -> 1; 2 x 0.25 / 1.5 = 0.33 -> 1 (at least one)
    working = {"policy": ("a", 1.0), "reference": ("a", 0.25), "reward": ("a", 0.25)}
    assert phase_threads(working, {"a": 2.0}) == {"policy": 1, "reference": 1, "reward": 1}
    # 4 CPUs held, 3 equal learners: 4/3 -> 1 each, the node is never oversubscribed
    learners = {f"rank{i}": ("a", 1.0) for i in range(3)}
    assert phase_threads(learners, {"a": 4.0}) == {f"rank{i}": 1 for i in range(3)}
    # 8 CPUs held: a 2-CPU and a 1-CPU actor get 16/3 = 5.33 -> 5 and 8/3 = 2.67 -> 2
    uneven = {"big": ("a", 2.0), "small": ("a", 1.0)}
    assert phase_threads(uneven, {"a": 8.0}) == {"big": 5, "small": 2}


def test_each_node_is_split_on_its_own():
    working = {"w0": ("a", 1.0), "w1": ("a", 1.0), "w2": ("b", 1.0)}
    held = {"a": 2.0, "b": 6.0}
    assert phase_threads(working, held) == {"w0": 1, "w1": 1, "w2": 6}


def test_two_workers_that_fill_a_node_keep_their_shares():
    # the default config's pool: 2 rollout workers of 0.5 on a node where the run holds 1 CPU
    working = {"rollout-0": ("a", 0.5), "rollout-1": ("a", 0.5)}
    assert phase_threads(working, {"a": 1.0}) == {"rollout-0": 1, "rollout-1": 1}
