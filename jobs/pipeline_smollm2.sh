#!/usr/bin/env bash
# The RLHF pipeline on a real model, on CPU: SmolLM2-135M-Instruct (builtin, converted once)
# through its own ChatML template, on the 300 bundled HH-RLHF pairs (builtin:hh-rlhf):
#
#   sft (from SmolLM2) -> train-rm (a score head on the SFT backbone) -> GRPO against that
#   reward model -> eval of the PPO policy against the SFT model, judged by the reward model
#
# Usage: jobs/pipeline_smollm2.sh OUT [DATA]   (DATA: default the bundled pairs)
# It is jobs/pipeline_local.sh with the model and these settings (each stage in process, one
# torch learner rank; every 3rd pair held out, so eval compares on 100 prompts: a win rate of 0.6
# already has its 95% interval above 0.5; 200 pairs train). GRPO, not PPO with a
# critic: on 2 cores a 135M critic would cost as much as the policy, and 4 samples per prompt
# give GRPO its baseline. Extra overrides go in SFT_ARGS, RM_ARGS, PPO_ARGS, EVAL_ARGS.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [DATA]" >&2
    exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${2:-$("${PYTHON:-python}" -c "import pathlib, rlhf_ray.data as d; print(pathlib.Path(d.__file__).parent / 'hh_rlhf_sample.jsonl')")}
MODEL=builtin:smollm2-135m-instruct
# the stages skip the epoch-end pass over the whole train split (a third of an epoch on CPU);
# and the reward model reads at most 192 tokens of a conversation (prompt up to 160)
COMMON="data.max_prompt_tokens=160 train.eval_train_split=false"
export HOLDOUT_EVERY=${HOLDOUT_EVERY:-3}
export SFT_ARGS="model.path=$MODEL optim.lr=1e-5 train.epochs=1 train.batch_size=8 \
    data.max_tokens=256 $COMMON ${SFT_ARGS:-}"
export RM_ARGS="optim.lr=1e-5 train.epochs=1 train.batch_size=8 data.max_tokens=192 $COMMON \
    ${RM_ARGS:-}"
export PPO_BASE_ARGS="algo.estimator=grpo rollout.samples_per_prompt=4 rollout.batch_size=8 \
    ppo.minibatch_size=16 ppo.epochs=1 ppo.kl_coef=0 ppo.kl_in_loss=k3 ppo.kl_loss_coef=0.01 \
    ppo.loss_agg=seq_mean_token_mean policy.optim.lr=1e-5 data.chat_template=true \
    data.max_prompt_tokens=160 rollout.max_new_tokens=32 rollout.temperature=0.7 train.rounds=30"
export EVAL_ARGS="data.chat_template=true data.max_prompt_tokens=160 rollout.max_new_tokens=32 \
    rollout.temperature=0.7 ${EVAL_ARGS:-}"
exec "$HERE/pipeline_local.sh" "$DATA" "$OUT"
