"""finetune.py under torchrun, also dumping each rank's LoRA weights for comparison.

torchrun --nproc_per_node=2 tests/ddp_driver.py <finetune flags>   (DUMP_DIR=... in the environment)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune  # noqa: E402
from platy import cli  # noqa: E402

save = finetune.save


def save_and_dump(setup, trainer, run_config, result):
    from safetensors.torch import save_file

    lora = {n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters() if "lora_" in n}
    save_file(lora, str(Path(os.environ["DUMP_DIR"]) / f"rank{os.environ['RANK']}.safetensors"))
    save(setup, trainer, run_config, result)


finetune.save = save_and_dump
cli.run(finetune.train)
