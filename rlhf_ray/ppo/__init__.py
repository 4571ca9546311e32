"""The PPO recipe: ``loop.run_ppo`` (generate, score, advantage, update, sync, log, read top to
bottom) and what only a PPO run uses: its prompt feed (``batches``), checkpoints, rollout dumps,
the post-sync sampling check, the control file, recovery, replay, ``rlhf-ray generate`` and the
preflight that refuses a bad run before any actor starts."""
