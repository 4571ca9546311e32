#!/usr/bin/env bash
# The whole RLHF pipeline on CPU, from a preference file to an evaluated policy:
#
#   sft -> train-rm -> ppo (against that reward model) -> eval (PPO policy vs the SFT model)
#
# Usage: jobs/pipeline_local.sh DATA OUT
#   DATA  preference pairs: HH-RLHF `chosen`/`rejected` transcripts, or `prompt`/`chosen`/
#         `rejected` rows, as JSONL or JSONL.gz
#   OUT   output directory; leaves OUT/sft/model, OUT/rm/reward_model, OUT/ppo/policy,
#         OUT/eval/eval.json and OUT/eval/eval.md (plus each stage's config.yaml and metrics.jsonl)
#
# Every 10th pair of DATA is held out (OUT/data/heldout.jsonl): eval's prompts are never trained
# on. The other pairs train sft (their chosen replies), the reward model and PPO (their prompts).
# Models are the tiny GPT-2 preset with the built-in byte-level tokenizer, so it runs offline in
# minutes; the reward model starts from the SFT model, and so does the PPO critic (from the
# reward model: value.init_from_reward).
#
# Environment:
#   RLHF_RAY_MODE   --in-process (default: every stage in this process) or "ray" (each stage
#                   starts a local Ray, as `ray job submit` would run it on a cluster)
#   SFT_ARGS, RM_ARGS, PPO_ARGS, EVAL_ARGS   extra `key=value` overrides for each stage
#   MAX_PAIRS       use at most this many pairs of DATA (default: all)
#   HOLDOUT_EVERY   every Nth pair is held out for eval (default 10)
#   PPO_BASE_ARGS   the PPO stage's own settings (default: a critic from the reward model, 15
#                   rounds of 64 prompts); PPO_ARGS come after them
#   START_AT        sft (default), train-rm, ppo or eval: begin there, reusing the outputs the
#                   earlier stages left in OUT (a pipeline stopped part-way goes on)
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DATA OUT" >&2
    exit 2
fi
DATA=$1
OUT=$2
MODE=${RLHF_RAY_MODE:---in-process}
[ "$MODE" = "ray" ] && MODE=""
PY=${PYTHON:-python}
mkdir -p "$OUT/data"

# 0. split: every 10th pair held out for eval
"$PY" - "$DATA" "$OUT/data" "${MAX_PAIRS:-0}" "${HOLDOUT_EVERY:-10}" <<'PYEOF'
import gzip, json, sys
from pathlib import Path
src, out, limit, every = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
opener = gzip.open if src.endswith(".gz") else open
with opener(src, "rt", encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]
rows = rows[:limit] if limit > 0 else rows
for name, keep in (("train", lambda i: i % every != every - 1),
                   ("heldout", lambda i: i % every == every - 1)):
    (out / f"{name}.jsonl").write_text("".join(r if r.endswith("\n") else r + "\n"
                                               for i, r in enumerate(rows) if keep(i)))
held = sum(i % every == every - 1 for i in range(len(rows)))
print(f"[pipeline] {len(rows)} pairs: {len(rows) - held} train, {held} held out", flush=True)
PYEOF
TRAIN=$OUT/data/train.jsonl
HELDOUT=$OUT/data/heldout.jsonl
# in process: one learner rank with plain torch; on Ray: the stages' default ZeRO-2 groups
LEARNER="" ROLES=""
if [ -n "$MODE" ]; then
    LEARNER="learner.engine=torch learner.num_ranks=1"
    ROLES="policy.engine=torch policy.num_ranks=1 value.engine=torch rollout.num_workers=1"
fi

STAGES="sft train-rm ppo eval"
START_AT=${START_AT:-sft}
case " $STAGES " in *" $START_AT "*) ;; *) echo "START_AT=$START_AT: not one of $STAGES" >&2; exit 2 ;; esac
skipping=1
stage() {  # stage NAME COMMAND...: run one stage, timed (those before START_AT: skipped)
    local name=$1
    shift
    [ "$name" = "$START_AT" ] && skipping=0
    if [ "$skipping" = 1 ]; then
        echo "[pipeline] $name: skipped (START_AT=$START_AT), its outputs in $OUT reused" >&2
        return
    fi
    local start=$SECONDS
    echo "[pipeline] $name: rlhf-ray $*" >&2
    "$PY" -m rlhf_ray.cli "$@"
    echo "[pipeline] $name done in $((SECONDS - start))s" >&2
}

# 1. sft: the chosen replies
# shellcheck disable=SC2086
stage sft sft $MODE --run-dir "$OUT/sft" data.path="$TRAIN" $LEARNER ${SFT_ARGS:-}

# 2. train-rm: Bradley-Terry on the pairs, starting from the SFT model
# shellcheck disable=SC2086
stage train-rm train-rm $MODE --run-dir "$OUT/rm" data.path="$TRAIN" \
    model.path="$OUT/sft/model" $LEARNER ${RM_ARGS:-}

# 3. ppo: the SFT policy against the reward model (its tokenizer comes from the model dirs)
# shellcheck disable=SC2086
stage ppo ppo $MODE --run-dir "$OUT/ppo" data.prompts="$TRAIN" \
    policy.model.path="$OUT/sft/model" reward.model.path="$OUT/rm/reward_model" \
    ${PPO_BASE_ARGS:-value.init_from_reward=true train.rounds=15 rollout.batch_size=64 ppo.minibatch_size=32} \
    $ROLES ${PPO_ARGS:-}

# 4. eval: the PPO policy against the SFT model on the held-out prompts, judged by the RM
# shellcheck disable=SC2086
stage eval eval $MODE --run-dir "$OUT/eval" --policy "$OUT/ppo/policy" \
    --baseline "$OUT/sft/model" --reward-model "$OUT/rm/reward_model" \
    data.prompts="$HELDOUT" eval.num_prompts=null ${EVAL_ARGS:-}

echo "[pipeline] done: $OUT/eval/eval.md"
