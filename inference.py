r"""Generate answers with a base model, base + adapter, or a merged model.

    # one question, with the adapter written by finetune.py (base and template from its run_config.json)
    python inference.py --lora_weights ./outputs/platypus-qlora --prompt "What is 12 + 30?"

    # a file of prompts (JSON, JSONL, CSV or Parquet with instruction and optional input), batched
    python inference.py --base_model ./outputs/merged --prompts_file questions.jsonl --output_file answers.jsonl

    # Platypus's spelling, and an interactive loop that streams tokens
    python inference.py --base_model ./outputs/merged --csv_path q.csv --output_csv_path a.csv
    python inference.py --base_model ./outputs/merged --interactive

temperature 0 (the default) is greedy decoding; batched greedy output equals one-at-a-time output.
"""

from platy import cli
from platy import inference_stages as stages


def main(
    base_model: str = None,
    lora_weights: str = None,
    prompt_template: str = None,
    chat_template: bool = True,
    prompt: str = None,
    input: str = None,
    prompts_file: str = None,
    output_file: str = None,
    csv_path: str = None,
    output_csv_path: str = None,
    interactive: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    load_8bit: bool = None,
    load_4bit: bool = None,
    seed: int = 42,
    trust_remote_code: bool = False,
):
    """Generate responses for one prompt, a prompts file, or interactively.

    Args:
        base_model: Hub id or folder of the base or merged model; default: the base recorded
            in the adapter's run_config.json.
        lora_weights: Adapter folder written by finetune.py (optional).
        prompt_template: Template name or path; default: the adapter's or merged model's
            recorded template, else alpaca.
        chat_template: Format prompts with the model's chat template when its tokenizer has one (what
            finetune.py --chat_template saved), stopping at its end-of-turn token; false uses
            --prompt_template.
        prompt: One instruction to answer (printed to stdout).
        input: The optional input that goes with --prompt.
        prompts_file: JSON, JSONL, CSV or Parquet rows with instruction and optional input.
        output_file: Where the rows go with a 'response' column added (same format as its
            suffix); default: print them.
        csv_path: Platypus's spelling of --prompts_file for CSV.
        output_csv_path: Platypus's spelling of --output_file for CSV; the answers go to a
            'model_output' column, as Platypus's inference.py writes them.
        interactive: A prompt loop that streams the answer as it is generated.
        max_new_tokens: Most tokens generated per answer.
        temperature: 0 = greedy (default); above 0 samples with this temperature.
        top_p: Nucleus sampling threshold (with temperature > 0).
        num_beams: Beam search width (1 = none).
        repetition_penalty: Above 1.0 discourages repeating tokens.
        batch_size: Prompts generated together (left-padded).
        load_8bit: Load the base in 8-bit (bitsandbytes). Default with --lora_weights: load the
            base as the adapter was trained (4-bit, 8-bit or not quantized), so the answers are
            those of the trained adapter; False loads it unquantized.
        load_4bit: Load the base in 4-bit NF4 (bitsandbytes); default as for --load_8bit.
        seed: Seed for sampling.
        trust_remote_code: Allow model code from the hub.
    """
    flags = dict(locals())
    cli.fail_on(stages.check_flags(flags))
    run = stages.resolve(flags)
    model, tokenizer, prompter = stages.load_for_generation(run)
    generator = stages.Generator(model, tokenizer, prompter, run)
    if run.interactive:
        stages.interactive_loop(generator)
    elif run.rows is not None:
        stages.answer_file(generator, run)
    else:
        stages.answer_prompt(generator, run)


if __name__ == "__main__":
    cli.run(main)
