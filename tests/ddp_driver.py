"""finetune.py's stages under torchrun, also dumping each rank's LoRA weights and their learning rates.

torchrun --nproc_per_node=2 tests/ddp_driver.py <finetune flags>   (DUMP_DIR=... in the environment)
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from platy import cli  # noqa: E402
from platy.flags import declared  # noqa: E402
from platy.train.flags import TRAIN_FLAGS  # noqa: E402
from platy.train.recipe import Recipe  # noqa: E402


def dump_lora(trainer):
    from safetensors.torch import save_file

    named = [(n, p) for n, p in trainer.model.named_parameters() if "lora_" in n]
    dump = Path(os.environ["DUMP_DIR"]) / f"rank{os.environ['RANK']}"
    save_file({n: p.detach().cpu().contiguous() for n, p in named}, f"{dump}.safetensors")
    rates = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    Path(f"{dump}-lr.json").write_text(json.dumps({n: rates.get(id(p)) for n, p in named}))


@declared(TRAIN_FLAGS)  # finetune.py's flags, defaults and checks
def train_and_dump(**flags):
    """finetune.py's run, with each rank's LoRA weights and learning rates dumped after training."""
    prepared = Recipe.from_flags(flags).setup()
    prepared.train()
    dump_lora(prepared.trainer)
    prepared.save()


cli.run(train_and_dump)
