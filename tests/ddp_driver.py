"""finetune.py's stages under torchrun, also dumping each rank's LoRA weights for comparison.

torchrun --nproc_per_node=2 tests/ddp_driver.py <finetune flags>   (DUMP_DIR=... in the environment)
"""

import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune  # noqa: E402
from platy import cli  # noqa: E402
from platy.train import stages  # noqa: E402


def dump_lora(trainer):
    from safetensors.torch import save_file

    lora = {n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters() if "lora_" in n}
    save_file(lora, str(Path(os.environ["DUMP_DIR"]) / f"rank{os.environ['RANK']}.safetensors"))


@functools.wraps(finetune.train)  # finetune.py's flags, defaults and checks
def train_and_dump(**given):
    prepared = stages.prepare({**cli.entry_defaults(finetune.train), **given})
    result = stages.run_training(prepared.run, prepared.trainer)
    dump_lora(prepared.trainer)
    stages.save(prepared.run, prepared.trainer, prepared.run_config, result)


cli.run(train_and_dump)
