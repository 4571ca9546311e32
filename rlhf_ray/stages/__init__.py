"""The stages around PPO, each a readable top-to-bottom function like ``driver.run_ppo``."""
