"""Per-prompt columns reach the reward; composed rewards; the preference_overlap reward; a
failing service stops the run before any round trains on a part of its batch. In process."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.config.ppo import TokenizerConfig, load_config
from rlhf_ray.data.prompts import load_prompt_set
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.dumps import read_dump
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.preflight import preflight_ppo
from rlhf_ray.rewards.functions import call_reward_function, preference_overlap
from rlhf_ray.rewards.remote import RemoteRewardError
from rlhf_ray.workers.inprocess import InProcessWorkers
from tests.helpers.model_dirs import save_reward_model
from tests.helpers.reward_fns import labelled_prompts
from tests.helpers.reward_servers import RewardServer

SMALL = [
    "policy.engine=torch",
    "policy.num_ranks=1",
    "value.engine=torch",
    "rollout.batch_size=4",
    "ppo.minibatch_size=4",
    "rollout.max_new_tokens=8",
    "logging.progress=false",
]


def test_preference_overlap_by_hand():
    # response words {the, cat, sat}: 2 of chosen's 3 words, 1 of rejected's 4; equal lengths
    assert preference_overlap(["p"], ["The cat sat."], ["the cat ran"], ["a dog sat down"]) == [
        pytest.approx(2 / 3 - 1 / 4)
    ]
    # 1 word against chosen's 2: overlap 1/2, rejected 0, length penalty |1 - 2| / 2
    assert preference_overlap(["p"], ["yes"], ["yes sure"], ["no"]) == [pytest.approx(0.4)]


def test_functions_get_the_columns_they_declare_aligned_with_responses():
    columns = [{"label": "a", "n": 1}, {"label": "b", "n": 2}]

    def by_label(prompts, responses, label, missing=None):
        assert missing is None
        return [float(x == "b") for x in label]

    def everything(prompts, responses, **cols):
        return [float(len(cols["label"]) + cols["n"][i]) for i in range(len(responses))]

    assert call_reward_function(by_label, "f", ["p", "q"], ["r", "s"], columns) == [0.0, 1.0]
    assert call_reward_function(everything, "f", ["p", "q"], ["r", "s"], columns) == [3.0, 4.0]


def test_prompt_rows_keep_their_columns(tmp_path):
    loaded = load_prompt_set(str(labelled_prompts(tmp_path / "p.jsonl", 3)))
    assert loaded.column_names == ("label",) and [c["label"] for c in loaded.columns] == [
        "0",
        "1",
        "2",
    ]
    hh = load_prompt_set("rlhf_ray/data/hh_rlhf_sample.jsonl")
    assert set(hh.column_names) == {"chosen", "rejected"}
    assert "Human:" not in hh.columns[0]["chosen"]  # the final reply, not the transcript


def test_preflight_refuses_a_function_asking_for_a_missing_column(tmp_path):
    cfg = load_config(None, ["reward.function=tests.helpers.reward_fns:label_term"])
    with pytest.raises(UserError, match=r"label_term.*\['label'\].*data.prompts"):
        preflight_ppo(cfg, None, False, ["."])
    prompts = labelled_prompts(tmp_path / "p.jsonl")
    ok = load_config(
        None, ["reward.function=tests.helpers.reward_fns:label_term", f"data.prompts={prompts}"]
    )
    preflight_ppo(ok, None, False, ["."])


@pytest.fixture(scope="module")
def composed_run(tmp_path_factory):
    """A reward model plus a label-reading term with weight -0.5 and a **columns term, GRPO
    with 4 samples per prompt over 2 in-process workers, every round dumped."""
    root = tmp_path_factory.mktemp("composed")
    prompts = labelled_prompts(root / "prompts.jsonl")
    rm = save_reward_model(root / "rm", build_tokenizer(TokenizerConfig(kind="bytes")))
    terms = (
        "[{name: label, weight: -0.5, function: 'tests.helpers.reward_fns:label_term'}, "
        "{name: length, weight: 0.0, function: 'tests.helpers.reward_fns:length_term'}]"
    )
    cfg = load_config(
        None,
        [
            *SMALL,
            "train.rounds=2",
            "reward.function=null",
            f"reward.model.path={rm}",
            "reward.normalize=none",
            f"reward.terms={terms}",
            f"data.prompts={prompts}",
            "algo.estimator=grpo",
            "rollout.samples_per_prompt=4",
            "rollout.num_workers=2",
            "logging.dump_rollouts_every=1",
        ],
    )
    run_ppo(cfg, InProcessWorkers(cfg), root / "run")
    return root / "run"


def test_composed_total_is_model_minus_half_the_term_per_sample(composed_run):
    rows = [
        row for r in range(2) for row in read_dump(composed_run / f"rollouts/round_{r:06d}.jsonl")
    ]
    assert len(rows) == 2 * 16
    for row in rows:
        parts = row["score_parts"]
        assert row["score"] == pytest.approx(parts["main"] - 0.5 * parts["label"], abs=1e-6)
        assert f"item {row['columns']['label']}." in row["prompt"]  # its own prompt's label
    metrics = read_metrics(composed_run / "metrics.jsonl")
    for m in metrics:
        assert {"reward/main_mean", "reward/label_mean", "reward/length_mean"} <= set(m)
        total = m["reward/main_mean"] - 0.5 * m["reward/label_mean"]
        assert m["rollout/reward_mean"] == pytest.approx(total, abs=1e-5)


def test_a_failing_service_stops_the_run_before_a_partial_batch_trains(tmp_path):
    server = RewardServer()
    server.mode = "fail_after:3"  # round 0: 2 requests; round 1: one answered, one refused
    try:
        remote = f"{{url: '{server.url}', batch_size: 2, max_retries: 1, backoff_s: 0.01}}"
        cfg = load_config(
            None, [*SMALL, "train.rounds=3", "reward.function=null", f"reward.remote={remote}"]
        )
        with pytest.raises(RemoteRewardError, match=f"{server.url}.*HTTP 500"):
            run_ppo(cfg, InProcessWorkers(cfg), tmp_path)
    finally:
        server.stop()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0]  # round 1 never reached the update
    assert rows[0]["reward/remote_retries"] == 0 and rows[0]["reward/remote_latency_s"] > 0
    first_line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    strict = json.loads(first_line, parse_constant=lambda c: pytest.fail(f"{c} in metrics"))
    assert strict == rows[0] and strict["round"] == 0  # strict JSON: no NaN/Infinity
    assert torch.isfinite(torch.tensor(rows[0]["rollout/reward_mean"]))


def test_reward_config_sources_default_to_the_documented_values():
    remote = load_config(None, ["reward.remote.url=http://127.0.0.1:9/score"])
    assert remote.reward.function is None and remote.reward.remote.max_retries == 5
    assert remote.reward.remote.ca_bundle is None


TWO_TS = (
    "reward.terms=[{name: t, weight: 1, function: 'a:b'}, {name: t, weight: 2, function: 'a:b'}]"
)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["reward.remote.url=ftp://x"], "`reward.remote`: url 'ftp://x' must be an http://"),
        (
            ["reward.function=a:b", "reward.remote.url=http://h/s"],
            "`reward`: set exactly one of `function`, `model` and `remote`",
        ),
        (
            ["reward.terms=[{name: main, weight: 1, function: 'a:b'}]"],
            "`reward.terms.0`: term name 'main' must be an identifier other than 'main'",
        ),
        (
            ["reward.terms=[{name: t, weight: 1}]"],
            "`reward.terms.0`: term 't': set exactly one of `function`, `remote` and `model`",
        ),
        ([TWO_TS], "`reward`: reward.terms names must differ, got ['t', 't']"),
        (
            ["reward.remote={url: 'http://10.0.0.1/score', token_env: T}"],
            "`reward.remote`: token_env 'T' would send the token in clear over http://",
        ),
        (
            ["reward.remote={url: 'http://127.0.0.1/score', ca_bundle: ca.pem}"],
            "`reward.remote`: ca_bundle is set but url 'http://127.0.0.1/score' is not https://",
        ),
    ],
)
def test_reward_config_errors_name_the_setting_and_the_problem(overrides, says):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert says in str(err.value)


def test_plan_shows_a_service_as_a_row_without_resources():
    from rlhf_ray.distributed.plan import resource_plan

    cfg = load_config(None, ["reward.remote.url=http://127.0.0.1:9/score"])
    rows = {r.role: r for r in resource_plan(cfg)}
    assert (rows["remote"].actors, rows["remote"].total_cpus, rows["remote"].total_gpus) == (
        0,
        0,
        0,
    )
    assert "remote" not in {r.role for r in resource_plan(load_config())}


def test_text_scorer_passes_metadata_as_columns():
    from rlhf_ray.distributed.reward_service import check_request
    from rlhf_ray.workers.text_reward import TextRewardScorer

    scorer = TextRewardScorer(function="tests.helpers.reward_fns:label_term", search_path=["."])
    prompts = ["Tell me about item 2.", "Tell me about item 3."]
    assert scorer.score(prompts, ["ab", "AB"], [{"label": "2"}, {"label": "3"}]) == [1.0, 1.0]
    assert check_request({"prompts": prompts, "responses": ["a", "b"]}) is None
    assert "metadata" in check_request({"prompts": ["a"], "responses": ["b"], "metadata": [1]})


def test_preference_overlap_runs_on_hh_prompts_only():
    hh = "data.prompts=rlhf_ray/data/hh_rlhf_sample.jsonl"
    overlap = "reward.function=rlhf_ray.rewards:preference_overlap"
    preflight_ppo(load_config(None, [overlap, hh]), None, False, ["."])
    with pytest.raises(UserError, match=r"\['chosen', 'rejected'\]"):
        preflight_ppo(load_config(None, [overlap]), None, False, ["."])
