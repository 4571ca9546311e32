#!/usr/bin/env bash
# Two reward models trained by `rlhf-ray train-rm` with different seeds on the bundled HH-RLHF
# pairs, then PPO against their ensemble (jobs/ppo_ensemble_hh.yaml), all in this process.
#
# Usage: jobs/ensemble_hh.sh [OUT]   (default /tmp/rlhf-runs; extra PPO overrides in PPO_ARGS)
set -euo pipefail
OUT=${1:-/tmp/rlhf-runs}
PY=${PYTHON:-python}
ONE_RANK="learner.engine=torch learner.num_ranks=1"
for seed in 1 2; do
    # shellcheck disable=SC2086
    "$PY" -m rlhf_ray.cli train-rm --in-process --config jobs/rm_hh.yaml \
        --run-dir "$OUT/rm-hh-seed$seed" train.seed=$seed model.init_seed=$seed $ONE_RANK
done
# shellcheck disable=SC2086
"$PY" -m rlhf_ray.cli ppo --in-process --config jobs/ppo_ensemble_hh.yaml \
    --run-dir "$OUT/ppo-ensemble-hh" \
    "reward.model=[{path: $OUT/rm-hh-seed1/reward_model}, {path: $OUT/rm-hh-seed2/reward_model}]" \
    policy.engine=torch policy.num_ranks=1 value.engine=torch rollout.num_workers=1 \
    ${PPO_ARGS:-}
