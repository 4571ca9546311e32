#!/usr/bin/env bash
# A reward service and PPO against it, on one Ray cluster (README, "Remote rewards").
#
#   jobs/remote_reward.sh REWARD_MODEL_DIR [ppo overrides ...]
#
# 1. `rlhf-ray serve-reward` runs as a job: a Ray Serve app whose HTTP proxy listens on
#    127.0.0.1:$REWARD_PORT on every node, so the reward actors call it on their own node and
#    nothing listens on a public address (for that, add --host 0.0.0.0 --token-env NAME).
# 2. PPO (jobs/grpo_cpu.yaml here) runs as a second job with reward.remote.url pointing at it.
# 3. The service job is stopped when PPO ends (or this script is interrupted).
#
# REWARD_MODEL_DIR must be readable on the cluster (e.g. RUN/reward_model of train-rm on shared
# storage, or inside the working directory). Environment: RAY_JOBS_ADDRESS (default
# http://127.0.0.1:8265, a local `ray start --head`), REWARD_PORT (default 8000).
set -euo pipefail
model=${1:?usage: jobs/remote_reward.sh REWARD_MODEL_DIR [ppo overrides ...]}
shift
address=${RAY_JOBS_ADDRESS:-http://127.0.0.1:8265}
port=${REWARD_PORT:-8000}
url="http://127.0.0.1:${port}/reward/score"
env_file=jobs/runtime_env_cpu.yaml

serve_job=$(ray job submit --address "$address" --runtime-env "$env_file" --no-wait \
    -- rlhf-ray serve-reward --reward-model "$model" --port "$port" \
    | sed -n "s/.*Job '\([^']*\)' submitted.*/\1/p" | head -n 1)
trap 'ray job stop --address "$address" "$serve_job" >/dev/null || true' EXIT
echo "reward service job: $serve_job"

for _ in $(seq 1 120); do  # until the service prints its URL (Serve start-up: tens of seconds)
    if ray job logs --address "$address" "$serve_job" 2>/dev/null | grep -q "serving rewards at"; then
        break
    fi
    sleep 2
done

ray job submit --address "$address" --runtime-env "$env_file" \
    -- rlhf-ray ppo --config jobs/grpo_cpu.yaml reward.function=null \
    "reward.remote.url=$url" "$@"
