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
from platy.flags import Flag, Flags, declared

FLAGS = Flags(
    Flag(
        "base_model",
        None,
        str,
        "Hub id or folder of the base or merged model; default: the base recorded in the adapter's run_config.json.",
    ),
    Flag(
        "lora_weights",
        None,
        str,
        "Adapter folder written by finetune.py (optional).",
    ),
    Flag(
        "prompt_template",
        None,
        str,
        "Template name or path; default: the one the adapter or merged model was trained with (its "
        "run_config.json), else alpaca. Given, it overrides a recorded chat template too, with a note.",
    ),
    Flag(
        "chat_template",
        None,
        bool,
        "Default: prompts as the model was trained (its run_config.json: its chat template, stopping at the "
        "end-of-turn token, or its prompt template); a model without one uses its tokenizer's chat template "
        "where it has one, else --prompt_template. True: the tokenizer's chat template; False: the prompt template; "
        "either overrides the record, with a note.",
    ),
    Flag(
        "prompt",
        None,
        str,
        "One instruction to answer (printed to stdout).",
    ),
    Flag(
        "input",
        None,
        str,
        "The optional input that goes with --prompt.",
    ),
    Flag(
        "prompts_file",
        None,
        str,
        "JSON, JSONL, CSV or Parquet rows with instruction and optional input, or messages (a conversation of "
        "one or more exchanges ending with a user turn, answered as the next assistant turn; several exchanges "
        "need a chat template).",
    ),
    Flag(
        "output_file",
        None,
        str,
        "Where the rows go with a 'response' column added (same format as its suffix); default: print them.",
    ),
    Flag(
        "csv_path",
        None,
        str,
        "Platypus's spelling of --prompts_file for CSV.",
    ),
    Flag(
        "output_csv_path",
        None,
        str,
        "Platypus's spelling of --output_file for CSV; the answers go to a 'model_output' column, as "
        "Platypus's inference.py writes them.",
    ),
    Flag(
        "interactive",
        False,
        bool,
        "A prompt loop that streams the answer as it is generated.",
    ),
    Flag(
        "max_new_tokens",
        256,
        int,
        "Most tokens generated per answer.",
    ),
    Flag(
        "temperature",
        0.0,
        float,
        "0 = greedy (default); above 0 samples with this temperature.",
    ),
    Flag(
        "top_p",
        1.0,
        float,
        "Nucleus sampling threshold (with temperature > 0).",
    ),
    Flag(
        "num_beams",
        1,
        int,
        "Beam search width (1 = none).",
    ),
    Flag(
        "repetition_penalty",
        1.0,
        float,
        "Above 1.0 discourages repeating tokens.",
    ),
    Flag(
        "batch_size",
        8,
        int,
        "Prompts generated together (left-padded).",
    ),
    Flag(
        "load_8bit",
        None,
        bool,
        "Load the base in 8-bit (bitsandbytes). Default with --lora_weights: load the base as the adapter was "
        "trained (4-bit, 8-bit or not quantized), so the answers are those of the trained adapter; False "
        "loads it unquantized.",
    ),
    Flag(
        "load_4bit",
        None,
        bool,
        "Load the base in 4-bit NF4 (bitsandbytes); default as for --load_8bit.",
    ),
    Flag(
        "seed",
        42,
        int,
        "Seed for sampling.",
    ),
    Flag(
        "trust_remote_code",
        False,
        bool,
        "Allow the code of the model named by --base_model (needed with it: the base an adapter's "
        "run_config.json names never runs code, nor does an adapter's tokenizer).",
    ),
)


@declared(FLAGS)
def main(**flags):
    """Generate responses for one prompt, a prompts file, or interactively."""
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
