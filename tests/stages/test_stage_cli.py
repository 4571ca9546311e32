"""``rlhf-ray sft`` / ``train-rm`` from the command line: in-process runs on the bundled sample,
printed configs and one-paragraph errors."""

from __future__ import annotations

import yaml

from rlhf_ray.cli import main
from rlhf_ray.observe.metrics import read_metrics

SMALL = ["--in-process", "learner.engine=torch", "learner.num_ranks=1", "train.epochs=1",
         "train.batch_size=128", "data.max_tokens=32", "data.max_prompt_tokens=24"]  # fmt: skip


def test_sft_then_train_rm_in_process_on_the_bundled_sample(tmp_path, capsys):
    assert main(["sft", "--run-dir", str(tmp_path / "sft"), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "270 train / 30 eval examples" in out and f"run dir: {tmp_path / 'sft'}" in out
    assert len([line for line in out.splitlines() if line.startswith("step ")]) == 2 + 1
    rm = ["train-rm", "--run-dir", str(tmp_path / "rm"), *SMALL]
    assert main([*rm, f"model.path={tmp_path}/sft/model"]) == 0
    out = capsys.readouterr().out
    assert "270 train / 30 eval pairs" in out and "train-rm done: eval accuracy" in out
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert {"epoch/train_accuracy", "eval/accuracy", "eval/margin"} <= set(rows[-2])
    assert (tmp_path / "rm" / "reward_model" / "tokenizer.json").exists()
    saved = yaml.safe_load((tmp_path / "rm" / "config.yaml").read_text())
    assert saved["model"]["path"] == f"{tmp_path}/sft/model"


def test_print_config_and_config_errors(capsys):
    assert main(["train-rm", "--print-config", "train.epochs=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 7
    assert main(["sft", "data.format=pairs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ray: Invalid config") and "data.format" in err
