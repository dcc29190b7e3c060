"""Training: flags (config.py) -> plan (plan.py) -> stages (stages.py) on the Trainer (trainer.py)."""
