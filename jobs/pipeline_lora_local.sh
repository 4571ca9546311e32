#!/usr/bin/env bash
# LoRA from end to end on CPU: an SFT adapter, PPO that trains that adapter further, and the
# export (adapter + merged model), checked:
#
#   base model dir -> sft (learner.lora) -> ppo (policy.model.path = the SFT adapter) -> check
#
# Usage: jobs/pipeline_lora_local.sh DATA OUT
#   DATA  preference pairs (HH-RLHF transcripts or prompt/chosen/rejected), JSONL or JSONL.gz;
#         e.g. rlhf_ray/data/hh_rlhf_sample.jsonl
#   OUT   output directory; leaves OUT/base (the tiny GPT-2 preset, saved), OUT/sft/model/adapter
#         (the SFT adapter; OUT/sft/model: merged), OUT/ppo/policy/adapter (the PPO adapter, on
#         OUT/base) and OUT/ppo/policy (merged, plain AutoModelForCausalLM)
#
# The last step loads the PPO adapter onto its base with peft (PeftModel.from_pretrained) and
# checks that the merged export gives the same log-probs, to 1e-5 in float32.
# Environment: SFT_ARGS, PPO_ARGS: extra `key=value` overrides; PYTHON.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 DATA OUT" >&2
    exit 2
fi
DATA=$1
OUT=$2
PY=${PYTHON:-python}
mkdir -p "$OUT"

# 0. a base model directory (the tiny preset, byte-level tokenizer), as a real base would be
"$PY" - "$OUT/base" <<'PYEOF'
import sys
from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm
build_causal_lm(ModelSpec(), build_tokenizer(TokenizerConfig())).save_pretrained(sys.argv[1])
PYEOF

# 1. sft: a LoRA adapter on the base (RUN/model/adapter names OUT/base as its base)
# shellcheck disable=SC2086
"$PY" -m rlhf_ray.cli sft --in-process --run-dir "$OUT/sft" data.path="$DATA" \
    model.path="$OUT/base" learner.engine=torch learner.num_ranks=1 learner.lora.r=16 \
    ${SFT_ARGS:-}

# 2. ppo: starts from the SFT adapter and trains it further (its own r, alpha, targets); the
# reference actor reads the SFT model (the adapter merged)
# shellcheck disable=SC2086
"$PY" -m rlhf_ray.cli ppo --in-process --run-dir "$OUT/ppo" \
    policy.model.path="$OUT/sft/model/adapter" policy.engine=torch policy.num_ranks=1 \
    value.engine=torch value.num_ranks=1 rollout.num_workers=1 train.rounds=3 \
    ${PPO_ARGS:-}

# 3. check the export: merged == base + adapter (peft), to 1e-5 in float32
"$PY" - "$OUT/base" "$OUT/ppo/policy" <<'PYEOF'
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from rlhf_ray.models import response_logprobs
base_dir, policy = sys.argv[1], sys.argv[2]
merged = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
peft = PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), f"{policy}/adapter"
)
ids = torch.tensor([list(b"Human: what is two plus two?\n\nAssistant: four")])
with torch.no_grad():
    a = response_logprobs(merged, ids, torch.ones_like(ids), 8)[0]
    b = response_logprobs(peft, ids, torch.ones_like(ids), 8)[0]
diff = float((a - b).abs().max())
print(f"[pipeline] merged export vs PeftModel + adapter: max |log-prob diff| {diff:.2e}")
assert diff <= 1e-5, diff
PYEOF
echo "[pipeline] done: $OUT/ppo/policy (merged) and $OUT/ppo/policy/adapter"
