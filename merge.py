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


def merge(
    base_model_name_or_path: str = None,
    peft_model_path: str = None,
    output_dir: str = None,
    device: str = "auto",
    method: str = "auto",
    dtype: str = "float16",
    max_shard_size: str = "auto",
    verify: bool = False,
    gguf: str = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    check: str = None,
    base_model: str = None,
    lora_weights: str = None,
):
    """Flags:

    Args:
        base_model_name_or_path: Base model (hub id or folder); default: the one the adapter's
            run_config.json records. Alias: --base_model.
        peft_model_path: The adapter folder (finetune.py's output_dir or a checkpoint-N).
            Alias: --lora_weights.
        output_dir: Where the merged model goes; must be new or empty unless --overwrite.
        device: Where the merge arithmetic runs: auto (cuda if present), cpu or cuda.
        method: auto, dequant or peft (see above).
        dtype: float16 (default), bfloat16 or float32 for the exported weights.
        max_shard_size: Largest safetensors shard, e.g. 5GB or 500MB; auto: the size of the
            base model's largest shard.
        verify: Compare the merged model's logits with base + adapter on a few prompts; with --gguf, also
            each GGUF file, loaded back by transformers' GGUF loader, with the merged model.
        gguf: Also write <output_dir>/<name>-<TYPE>.gguf for each comma-separated type: f16, bf16, q8_0,
            q5_1, q5_0, q4_1 or q4_0 (k-quants such as q4_k_m: the gguf package cannot write them; run
            llama.cpp's llama-quantize on the f16 file), and an Ollama Modelfile. Llama, Mistral and Qwen2.
        overwrite: Replace a non-empty output_dir (only once the new model is complete).
        trust_remote_code: Allow model code from the hub for --verify.
        check: Verify a folder written earlier (a merged model against the sha256 its
            merge_config.json records, a checkpoint or adapter against its manifest.json)
            and exit; merges nothing.
        base_model: Alias of --base_model_name_or_path.
        lora_weights: Alias of --peft_model_path.
    """
    flags = dict(locals())
    # check_flags -> --check alone, or resolve -> write_merged -> write_gguf_files -> check_merged -> check_gguf
    stages.merge(flags)


if __name__ == "__main__":
    cli.run(merge)
