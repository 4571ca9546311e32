"""Stage outputs plugged into ``ppo``: the tokenizer comes from the policy's model directory, a
reward model directory replaces the default reward, the critic can start from it, and a reward
model with its own tokenizer (another model family) reads the rollout text. That such a reward
model teaches the policy is shown by tests/stages/test_pipeline.py."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.config.ppo import TokenizerConfig, load_config, policy_tokenizer, resolve_tokenizer
from rlhf_ray.data.tokenization import TiktokenTokenizer, build_tokenizer, same_tokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.models import build_scalar_model
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.preflight import check_model_tokenizers
from rlhf_ray.types import Rollout
from rlhf_ray.workers.inprocess import InProcessWorkers
from rlhf_ray.workers.scorers import RewardScorer
from tests.helpers.model_dirs import bpe_tokenizer, save_policy, save_reward_model

SMALL = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "rollout.num_workers=1",
         "logging.progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A BPE tokenizer, a reward model with it, a byte-level and a BPE policy (random weights)."""
    root = tmp_path_factory.mktemp("models")
    bpe = bpe_tokenizer(root / "bpe")
    return {
        "bpe": bpe,
        "rm": save_reward_model(root / "rm", bpe),
        "bytes_policy": save_policy(root / "bytes_policy", TiktokenTokenizer.byte_level()),
        "bpe_policy": save_policy(root / "bpe_policy", bpe),
    }


def test_unset_tokenizer_comes_from_the_policy_dir(dirs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert resolve_tokenizer(TokenizerConfig(), None) == TokenizerConfig(kind="bytes")
    assert resolve_tokenizer(TokenizerConfig(), str(bare)) == TokenizerConfig(kind="bytes")
    found = resolve_tokenizer(TokenizerConfig(), str(dirs["bpe_policy"]))
    assert found == TokenizerConfig(kind="hf", name_or_path=str(dirs["bpe_policy"]))
    explicit = TokenizerConfig(kind="bytes")
    assert resolve_tokenizer(explicit, str(dirs["bpe_policy"])) == explicit  # set wins
    assert resolve_tokenizer(TokenizerConfig(), "org/some-model").kind == "hf"  # a hub id
    cfg = load_config(None, [f"policy.model.path={dirs['bpe_policy']}"])
    assert same_tokenizer(build_tokenizer(policy_tokenizer(cfg)), dirs["bpe"])


def test_an_adapter_dir_without_a_tokenizer_takes_its_bases(dirs, tmp_path):
    """A checkpoint's ``policy/adapter`` holds no tokenizer: the base it names has it (before,
    the built-in bytes were taken silently, a vocabulary the base model does not have)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(dirs["bpe_policy"])}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    found = resolve_tokenizer(TokenizerConfig(), str(adapter))
    assert found == TokenizerConfig(kind="hf", name_or_path=str(dirs["bpe_policy"]))
    config["base_model_name_or_path"] = None  # a preset's adapter names no base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert resolve_tokenizer(TokenizerConfig(), str(adapter)) == TokenizerConfig(kind="bytes")


def test_policy_dir_tokenizer_and_critic_from_reward_model_in_ppo(dirs, tmp_path):
    cfg = load_config(None, [*SMALL, f"policy.model.path={dirs['bpe_policy']}",
                             f"reward.model.path={dirs['rm']}", "value.init_from_reward=true",
                             "train.rounds=1", "rollout.batch_size=8", "ppo.minibatch_size=8",
                             "ppo.epochs=1"])  # fmt: skip
    check_model_tokenizers(cfg)
    workers = InProcessWorkers(cfg)
    rm = build_scalar_model(cfg.reward.model, dirs["bpe"])
    critic = workers.value.module.state_dict()
    assert all(torch.equal(critic[k], v) for k, v in rm.state_dict().items())
    assert workers.reward.text_tokenizer is None  # same tokenizer: it reads the token ids
    run_ppo(cfg, workers, tmp_path / "run")
    saved = build_tokenizer(TokenizerConfig(kind="hf", name_or_path=str(tmp_path / "run/policy")))
    assert same_tokenizer(saved, dirs["bpe"])


def test_critic_cannot_start_from_a_reward_model_of_another_tokenizer(dirs):
    cfg = load_config(None, [f"policy.model.path={dirs['bytes_policy']}",
                             f"reward.model.path={dirs['rm']}", "value.init_from_reward=true"])  # fmt: skip
    with pytest.raises(UserError, match="tokenizer other than the policy's"):
        check_model_tokenizers(cfg)


def test_reward_model_with_its_own_tokenizer_scores_the_text(dirs):
    cfg = load_config(None, [f"reward.model.path={dirs['rm']}"])
    policy_tok = TiktokenTokenizer.byte_level()
    scorer = RewardScorer(cfg.reward, policy_tokenizer(cfg))
    assert scorer.text_tokenizer is not None
    prompts, responses = ["Hi there.", "Say something:"], ["hello world", "ABC 123!!"]
    ids, mask = policy_tok.encode_batch_left_padded(prompts, 16)
    resp = [policy_tok.encode(r) + [policy_tok.eos_id] for r in responses]
    resp_ids = torch.full((2, 12), policy_tok.pad_id)
    resp_mask = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(resp):
        resp_ids[i, : len(r)], resp_mask[i, : len(r)] = torch.tensor(r), 1
    rollout = Rollout(ids, mask, torch.arange(2), resp_ids, resp_mask, torch.tensor([True, True]),
                      torch.zeros(2, 12), torch.zeros(2, dtype=torch.long), prompts, responses)  # fmt: skip
    got = scorer.score(rollout)
    bpe = dirs["bpe"]  # what the reward model saw: prompt + response text, then its own EOS
    rows = [bpe.encode(p + r) + [bpe.eos_id] for p, r in zip(prompts, responses, strict=True)]
    model = build_scalar_model(cfg.reward.model, bpe)
    with torch.no_grad():
        want = [
            float(model.sequence_scores(torch.tensor([r]), torch.ones(1, len(r)))) for r in rows
        ]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def _rollout(tok, prompt: str, response: list[int], width: int) -> Rollout:
    """A one-row rollout of ``response`` in ``width`` columns (pad after it)."""
    ids, mask = tok.encode_batch_left_padded([prompt], 16)
    resp_ids = torch.full((1, width), tok.pad_id)
    resp_mask = torch.zeros(1, width, dtype=torch.long)
    resp_ids[0, : len(response)], resp_mask[0, : len(response)] = torch.tensor(response), 1
    return Rollout(ids, mask, torch.arange(1), resp_ids, resp_mask,
                   torch.tensor([response[-1] == tok.eos_id]), torch.zeros(1, width),
                   torch.zeros(1, dtype=torch.long), [prompt], [tok.decode(response)])  # fmt: skip


@pytest.mark.parametrize("policy", ["bpe_policy", "bytes_policy"])  # token ids / text
def test_a_response_cut_before_eos_is_scored_as_a_finished_reply(dirs, policy):
    """train-rm reads every reply at its EOS; so does the reward actor, for a response that
    max_new_tokens cut as for one that ended (reward.append_eos=false: at its last token)."""
    overrides = [f"policy.model.path={dirs[policy]}", f"reward.model.path={dirs['rm']}"]
    on, off = (load_config(None, [*overrides, f"reward.append_eos={x}"]) for x in (True, False))
    tok = build_tokenizer(policy_tokenizer(on))
    scorer, as_cut = (RewardScorer(c.reward, policy_tokenizer(c)) for c in (on, off))
    assert (scorer.text_tokenizer is None) == (policy == "bpe_policy")
    for prompt, text in [("Hi there.", "hello world"), ("Say something:", "ABC 123!!")]:
        reply = tok.encode(text)
        cut = _rollout(tok, prompt, reply, len(reply))  # every column used, no EOS
        ended = _rollout(tok, prompt, [*reply, tok.eos_id], len(reply) + 4)
        assert not cut.has_eos.any() and ended.has_eos.all()
        torch.testing.assert_close(scorer.score(cut), scorer.score(ended))
        assert abs(float(as_cut.score(cut) - scorer.score(ended))) > 1e-4  # read elsewhere
