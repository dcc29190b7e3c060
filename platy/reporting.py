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


def plot_curves(log_history, path):
    """Loss (train and eval) and learning rate against the optimizer step, as a PNG; False (nothing
    drawn) when fewer than MIN_CURVE_POINTS training losses were logged."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    if len(train) < MIN_CURVE_POINTS:
        return False
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    lrs = [(r["step"], r["learning_rate"]) for r in log_history if "learning_rate" in r]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(*zip(*train), ".-", label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="eval loss (held-out rows)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    if lrs:
        ax_lr.plot(*zip(*lrs), ".-", color="tab:green")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Learning rate")
    for ax in (ax_loss, ax_lr):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
