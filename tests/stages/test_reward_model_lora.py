"""train-rm with a `lora` section (in-process): the adapters and the whole score head train
(``modules_to_save`` defaults to it), and the exported reward model, merged, scores by plain
transformers as the trained one did; its adapter directory holds the adapters and the head."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from rlhf_ray.config.stages import load_rm_config
from rlhf_ray.stages import rm_role, run_train_rm
from rlhf_ray.workers.inprocess import InProcessStage
from tests.stages.test_reward_model import (
    plain_transformers_scores,
    preference_rows,
    rm_overrides,
)


def test_a_lora_reward_model_trains_its_head_and_exports_what_it_scored(tmp_path):
    eval_rows = preference_rows(16, seed=1)
    overrides = rm_overrides(tmp_path, preference_rows(32, seed=0), eval_rows)
    cfg = load_rm_config(None, [*overrides, "learner.lora.r=4"])
    workers = InProcessStage(rm_role(cfg), cfg.train.dist_timeout_s)
    try:
        module = workers.learner.module
        head = module.head.original_module.weight.detach().clone()
        result = run_train_rm(cfg, workers, tmp_path / "run")
        scores = workers.scores("eval")
    finally:
        workers.close()
    saved = json.loads((result.output / "adapter" / "adapter_config.json").read_text())
    assert "score" in saved["modules_to_save"] and saved["task_type"] == "SEQ_CLS"
    adapter = load_file(str(result.output / "adapter" / "adapter_model.safetensors"))
    assert all(".lora_" in k or ".score." in k for k in adapter)
    trained_head = next(v for k, v in adapter.items() if ".score." in k)
    assert not torch.equal(trained_head, head)  # the head trained, not only the adapters
    chosen, rejected = plain_transformers_scores(result.output, eval_rows)
    torch.testing.assert_close(chosen, scores[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, scores[1], atol=1e-5, rtol=0)
    assert float((chosen > rejected).float().mean()) > 0.5
