"""Training: flags (flags.py, config.py) -> plan (plan.py) -> the recipe (recipe.py) that runs the stages on the
Trainer (trainer.py)."""
