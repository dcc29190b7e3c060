r"""Fuse a LoRA / QLoRA adapter into the base weights and export a standalone Hugging Face model.

    # base model and template come from the adapter's run_config.json
    python merge.py --peft_model_path ./outputs/platypus-qlora --output_dir ./outputs/merged --verify

    # and GGUF files for llama.cpp, Ollama and LM Studio, checked against the merged model
    python merge.py --peft_model_path ./outputs/platypus-qlora --output_dir ./outputs/merged --gguf f16,q8_0 --verify

    # later, after copying it: every shard against the sha256 merge_config.json records
    python merge.py --check ./outputs/merged

    # Platypus's spelling, explicit base, bfloat16 output in 2 GB shards
    python merge.py --base_model_name_or_path meta-llama/Llama-2-13b-hf \
        --peft_model_path ./Platypus2-13B-lora --output_dir ./Platypus2-13B --dtype bfloat16 --max_shard_size 2GB

Methods: `dequant` rebuilds the base exactly as it was quantized in training, dequantizes
it and adds the adapter to those weights (the weights the adapter was trained against);
`peft` adds the adapter to the original 16-bit weights. `auto` (default): dequant for an
adapter trained on a 4-bit or 8-bit base, peft otherwise. The merge streams tensor by
tensor: memory holds about one tensor plus the adapter, whatever the model size.
"""

from platy import cli
from platy import merge_stages as stages
from platy.flags import Flag, Flags, declared

FLAGS = Flags(
    Flag(
        "base_model_name_or_path",
        None,
        str,
        "Base model (hub id or folder); default: the one the adapter's run_config.json records. Alias: --base_model.",
    ),
    Flag(
        "peft_model_path",
        None,
        str,
        "The adapter folder (finetune.py's output_dir or a checkpoint-N). Alias: --lora_weights.",
    ),
    Flag(
        "output_dir",
        None,
        str,
        "Where the merged model goes: a new or empty folder, or an earlier merge with --overwrite.",
    ),
    Flag(
        "device",
        "auto",
        str,
        "Where the merge arithmetic runs: auto (cuda if present), cpu or cuda.",
    ),
    Flag(
        "method",
        "auto",
        str,
        "auto, dequant or peft (see above).",
    ),
    Flag(
        "dtype",
        "float16",
        str,
        "float16 (default), bfloat16 or float32 for the exported weights.",
    ),
    Flag(
        "max_shard_size",
        "auto",
        str,
        "Largest safetensors shard, e.g. 5GB or 500MB; auto: the size of the base model's largest shard.",
    ),
    Flag(
        "verify",
        False,
        bool,
        "Compare the merged model's logits with base + adapter on a few prompts; with --gguf, also each GGUF "
        "file, loaded back by transformers' GGUF loader, with the merged model.",
    ),
    Flag(
        "gguf",
        None,
        str,
        "Also write <output_dir>/<name>-<TYPE>.gguf for each comma-separated type: f16, bf16, q8_0, q5_1, "
        "q5_0, q4_1 or q4_0 (k-quants such as q4_k_m: the gguf package cannot write them; run llama.cpp's "
        "llama-quantize on the f16 file), and an Ollama Modelfile. Llama, Mistral and Qwen2.",
    ),
    Flag(
        "overwrite",
        False,
        bool,
        "Replace the earlier merge in output_dir (only once the new model is complete); nothing else is replaced.",
    ),
    Flag(
        "trust_remote_code",
        False,
        bool,
        "Allow the code of the model named by --base_model for --verify (needed with it: the base an adapter's "
        "run_config.json names never runs code).",
    ),
    Flag(
        "check",
        None,
        str,
        "Verify a folder written earlier (a merged model against the sha256 its merge_config.json records, a "
        "checkpoint or adapter against its manifest.json) and exit; merges nothing.",
    ),
    Flag(
        "base_model",
        None,
        str,
        "Alias of --base_model_name_or_path.",
    ),
    Flag(
        "lora_weights",
        None,
        str,
        "Alias of --peft_model_path.",
    ),
)


@declared(FLAGS)
def merge(**flags):
    """Fuse a LoRA adapter into its base model's weights: a standalone model folder (and GGUF files)."""
    # check_flags -> --check alone, or resolve -> write_merged -> write_gguf_files -> check_merged -> check_gguf
    stages.merge(flags)


if __name__ == "__main__":
    cli.run(merge)
