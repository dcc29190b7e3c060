"""What a run shows and leaves behind: progress with loss, curves, run configuration."""

import platform


def loss_progress_callback():
    """The Trainer's progress bar, with the latest loss and learning rate beside it.

    Each logging step also leaves one short line (kept in logs and CI output); the raw
    metrics dictionaries are not printed. (A factory: transformers is imported only when
    training starts, so argument errors come back fast.)
    """
    from transformers.trainer_callback import ProgressCallback

    class LossProgressCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            step = f"step {state.global_step}/{state.max_steps}"
            if "loss" in logs:
                lr = logs.get("learning_rate", 0)
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
                extra = f"  grad_norm {logs['grad_norm']:.3f}" if "grad_norm" in logs else ""
                if "rewards/margins" in logs:  # a preference run
                    extra += f"  margin {logs['rewards/margins']:.4f}  accuracy {logs['rewards/accuracies']:.2f}"
                self.training_bar.write(f"{step}  loss {logs['loss']:.4f}  lr {lr:.3e}{extra}")
            elif "eval_loss" in logs:
                self.training_bar.write(f"{step}  eval_loss {logs['eval_loss']:.4f}")

    return LossProgressCallback()


def library_versions(extra=()):
    """{package: version or None} of the libraries a run depends on, and of `extra` packages."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", *extra):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def say_configuration(title, values):
    """Print name=value pairs once at start, wrapped at 110 columns; a pair is never split."""
    from platy.cli import say

    lines, line = [], ""
    for pair in (f"{k}={v!r}" for k, v in values.items()):
        if line and len(line) + 2 + len(pair) > 110:
            lines.append(line)
            line = ""
        line = f"{line}  {pair}" if line else f"  {pair}"
    say(f"{title}:\n" + "\n".join(lines + [line]))


MIN_CURVE_POINTS = 3  # fewer logged losses draw no curve


def series(log_history, key):
    """(step, value) of every log entry holding key."""
    return [(r["step"], r[key]) for r in log_history if key in r]


def curve_panels(log_history):
    """The panels of training_curves.png: {title: [(label, points)]}. Loss and learning rate for every run; a
    preference run adds the mean rewards of the chosen and rejected answers with their margin, and the reward
    accuracy (held-out figures beside the training ones where they were evaluated)."""
    panels = {
        "Loss": [
            ("train loss", series(log_history, "loss")),
            ("eval loss (held-out rows)", series(log_history, "eval_loss")),
        ],
        "Learning rate": [("learning rate", series(log_history, "learning_rate"))],
    }
    if series(log_history, "rewards/margins"):
        panels["Rewards (beta x log-ratio)"] = [
            (label, series(log_history, prefix + key))
            for prefix, kind in (("", "train"), ("eval_", "held-out"))
            for key, label in (
                ("rewards/chosen", f"chosen ({kind})"),
                ("rewards/rejected", f"rejected ({kind})"),
                ("rewards/margins", f"margin ({kind})"),
            )
        ]
        panels["Reward accuracy"] = [
            ("train", series(log_history, "rewards/accuracies")),
            ("held-out", series(log_history, "eval_rewards/accuracies")),
        ]
    return {title: [(label, points) for label, points in lines if points] for title, lines in panels.items()}


def plot_curves(log_history, path):
    """curve_panels against the optimizer step, as a PNG; False (nothing drawn) when fewer than
    MIN_CURVE_POINTS training losses were logged."""
    if len(series(log_history, "loss")) < MIN_CURVE_POINTS:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(log_history)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, points in lines:
            ax.plot(*zip(*points), ".-", label=label)
        if title == "Learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        elif len(lines) > 1 or title == "Loss":
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
