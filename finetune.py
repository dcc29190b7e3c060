r"""Fine-tune a causal LM with LoRA / QLoRA on Alpaca-format instruction data (Platypus recipe).

    # the embedded tiny model on the bundled sample data (CPU, offline, about a minute)
    python finetune.py --base_model builtin:tiny-llama --data_path data/sample_platypus.json

    # Platypus2-13B on 4 GPUs, data parallel; batch_size is global
    torchrun --nproc_per_node=4 finetune.py --base_model meta-llama/Llama-2-13b-hf \
        --data_path garage-bAInd/Open-Platypus --output_dir ./Platypus2-13B-lora

    python finetune.py --help      # every flag, with its default

Defaults are Platypus's published hyperparameters; the base model is loaded in 4-bit NF4
(QLoRA) unless --quantization says otherwise.
"""

from platy import cli
from platy.flags import declared
from platy.train.flags import TRAIN_FLAGS
from platy.train.recipe import Recipe


@declared(TRAIN_FLAGS)  # every flag, its default and its help: platy/train/flags.py
def train(**flags):
    """Train a LoRA adapter; output_dir then holds everything merge.py and inference.py need."""
    recipe = Recipe.from_flags(flags)  # every flag problem at once, then the data, resume point and plan
    recipe.main()  # describe -> setup -> train -> save


if __name__ == "__main__":
    cli.run(train)
