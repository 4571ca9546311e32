"""The run's typed config: one pydantic schema split by the section it describes (``ppo`` for a
PPO run's top level, ``roles`` for models and learners, ``rewards``, ``stages`` for sft/train-rm/
eval), the ``Section`` base (``sections``) and YAML + ``key=value`` loading (``loading``).
Imports nothing of the package above ``errors``."""
