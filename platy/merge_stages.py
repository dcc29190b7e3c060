"""Export a merged model: the stages merge.py runs around the streaming merge of platy.merging.

merge(flags) runs them in order, for merge.py, the tests and the benchmarks alike: check_flags(flags)
finds every problem of the command line without reading a file; resolve(flags) reads the adapter and
the base into a MergeRun; write_merged builds the model folder next to its destination and swaps it
into place; write_gguf_files adds the GGUF files (--gguf); check_merged reads the written files back and
compares the model with base + adapter (--verify), check_gguf each GGUF file with the merged model;
check_folder re-verifies a folder later (--check).
"""

import datetime
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from platy import checks, cli, gguf_export, outputs
from platy.base_weights import base_checkpoint, resolve_base_model, resolve_local_base
from platy.cli import WRITE_FAILED, Stopped, UserError, say
from platy.files import MERGE_CONFIG, TOKENIZER_FILES, current_umask, swap_into_place, write_json, write_text
from platy.integrity import (
    MANIFEST,
    check_weights,
    file_digest,
    folder_problem,
    human_size,
    outside_problem,
    records_problem,
)
from platy.merging import DTYPES, METHODS, Adapter, merge_stream, output_config, parse_size
from platy.modeling import REMOTE_CODE_NEEDS_BASE

DEVICES = ("auto", "cpu", "cuda")
# --verify's largest logit difference, in units of the exported dtype's rounding at the reference's scale:
# tolerance = k x eps(dtype) x the largest |logit| of base + adapter. Measured difference / (eps x max |logit|) of
# correct merges, tiny model and SmolLM2-135M: float16 0.55 and 3.5, bfloat16 0.59 and 6.7 (rounding each weight
# and activation once); float32 2.5 and 18 (its weights hold the sum exactly enough that what remains is the order
# of float32 arithmetic along long sums and many layers, hence the larger k). Wrong merges (the update scaled by 2
# or 0.5, one layer's update missing) measured 63 and more in float16, 13 and more in bfloat16 (whose greedy
# agreement also fails), 500,000 and more in float32. Figures and adapters: docs/export.md.
VERIFY_ROUNDINGS = {"float32": 64, "float16": 8, "bfloat16": 8}
# GGUF against the merged model: (largest logit difference, greedy agreement) a type's rounding stays within.
# The difference allowed is the larger of the floor here and k x the type's rounding step x max |logit|, as for
# --verify: a model with logits of 40 moves 40 times more than one with logits of 1 under the same rounding.
# The step is relative to a block's scale: q8_0 rounds to 1/127 of it, q5_0 1/16, q5_1 1/31, q4_0 1/8, q4_1
# 1/15. f16 of a float16 merge holds the same numbers (bf16 and the quantized types round again). Measured on
# SmolLM2-135M's quick-start adapters (difference / (step x max |logit|), greedy agreement): f16 0, 100%; bf16
# 1.6, 100%; q8_0 3.7-4.2, 97-99.5% (and the same answers to the 30 held-out requests); q5_0 5.9, 82%; q4_0 3.9,
# 71%; q5_1 14.5, 58%; q4_1 11.6, 48%. The 5- and 4-bit files of a model this small change its greedy tokens
# more than their agreement floor allows: they warn, and their answers are worth checking (evaluate.py).
# type: (floor of the logit difference, least greedy agreement, rounding step)
GGUF_TOLERANCE = {
    "f16": (0.05, 0.99, 2**-10),
    "bf16": (0.5, 0.98, 2**-7),
    "q8_0": (0.5, 0.95, 1 / 127),
    "q5_1": (1.5, 0.9, 1 / 31),
    "q5_0": (1.5, 0.9, 1 / 16),
    "q4_1": (3.0, 0.85, 1 / 15),
    "q4_0": (3.0, 0.85, 1 / 8),
}
GGUF_ROUNDINGS = 8  # k
VERIFY_AGREEMENT = 0.99  # least share of positions where both pick the same greedy next token
VERIFY_PROMPTS = (
    "What is the boiling point of water at sea level?",
    "Is 91 a prime number?",
    "Explain Newton's second law in one sentence.",
    "다음 두 수의 합을 구하시오: 12, 30",
)


@dataclass(frozen=True)
class MergeRun:
    """One merge: what goes into it and where the merged model goes."""

    base: str  # the base as given or recorded
    base_path: str  # its local folder
    adapter: Adapter
    peft_model_path: str
    layout: dict | None  # how the base was quantized in training (None: not quantized)
    method: str  # dequant or peft
    dtype: str  # float16, bfloat16 or float32
    max_bytes: int  # largest shard
    output_dir: Path
    device: str
    verify: bool
    trust_remote_code: bool
    gguf_types: tuple = ()  # GGUF files to write after the merge (f16, q8_0, ...)
    companions: tuple = ()  # (name, source file) copied beside the weights: generation config, tokenizer


@dataclass(frozen=True)
class Merged:
    """What merge(flags) made: the run (None for --check) and the --verify reports (None when not asked)."""

    run: MergeRun | None
    verify: dict | None = None  # check_merged's report
    gguf_verify: dict | None = None  # check_gguf's report per GGUF type


def merge(flags):
    """merge.py's stages in the order they run: every flag checked; then --check alone, or the merged
    model written, its GGUF files, and --verify of the model and of each GGUF file."""
    cli.fail_on(check_flags(flags))
    if flags["check"]:
        check_folder(flags["check"])
        return Merged(run=None)
    run = resolve(flags)
    write_merged(run)
    if run.gguf_types:
        write_gguf_files(run)
    if not run.verify:
        return Merged(run)
    report = check_merged(run)
    return Merged(run, report, check_gguf(run) if run.gguf_types else None)


def disagreement(flags, name, alias):
    value, other = flags[name], flags[alias]
    if value and other and value != other:
        return f"--{name} {value} and --{alias} {other} disagree; give one of them"
    return None


def check_flags(flags):
    """Every problem of merge.py's flags, as sentences; reads no file."""
    if flags["check"]:
        given = [f"--{name}" for name in ("peft_model_path", "lora_weights", "output_dir") if flags[name]]
        return [f"--check verifies a folder on its own; drop {', '.join(given)}"] if given else []
    problems = checks.problems_of(
        disagreement(flags, "peft_model_path", "lora_weights"),
        disagreement(flags, "base_model_name_or_path", "base_model"),
    )
    if not (flags["peft_model_path"] or flags["lora_weights"]):
        problems.append("--peft_model_path is required (the adapter folder written by finetune.py)")
    if not flags["output_dir"]:
        problems.append("--output_dir is required (where the merged model goes)")
    problems += checks.problems_of(checks.choice("method", flags["method"], METHODS))
    if str(flags["dtype"]) not in DTYPES:
        problems.append(f"--dtype {flags['dtype']}: choose float16, bfloat16 or float32")
    if flags["device"] not in DEVICES and not str(flags["device"]).startswith("cuda:"):
        problems.append(f"--device {flags['device']}: choose auto, cpu or cuda")
    if flags["trust_remote_code"] and not flags["verify"]:
        problems.append("--trust_remote_code only matters for --verify (the merge itself runs no model code)")
    elif flags["trust_remote_code"] and not (flags["base_model_name_or_path"] or flags["base_model"]):
        problems.append(REMOTE_CODE_NEEDS_BASE)
    if flags["max_shard_size"] != "auto":
        problems += checks.problems_of(cli.problem_of(parse_size, flags["max_shard_size"]))
    if flags.get("gguf") is not None:
        problems += checks.problems_of(
            cli.problem_of(gguf_export.parse_types, flags["gguf"]), gguf_export.gguf_missing()
        )
    return problems


def resolve(flags):
    """The MergeRun of checked flags: the output folder made safe to write, the adapter read, the base
    found (as given or recorded by the adapter) and the method decided."""
    adapter_path = flags["peft_model_path"] or flags["lora_weights"]
    out = output_folder(flags["output_dir"], flags["overwrite"], adapter_path)
    adapter = Adapter(Path(adapter_path).expanduser())
    base = resolve_base(flags["base_model_name_or_path"] or flags["base_model"], adapter.base_model())
    layout = adapter.quantization_layout
    method = merge_method(flags["method"], layout)
    check_bitsandbytes(adapter.trained_quantization(), method, flags["verify"])
    device = merge_device(flags["device"])
    base_path = resolve_local_base(base, "--base_model")
    outputs.check_apart(out, outputs.MERGE, [("the base model folder", base_path)])
    gguf_types = tuple(gguf_export.parse_types(flags.get("gguf")))
    if gguf_types:  # before anything is written: an architecture, tokenizer or template the export cannot write
        gguf_export.check_recorded_templates(adapter.record)
        gguf_export.check_exportable(
            output_config(base_path, DTYPES[str(flags["dtype"])], adapter.vocabulary),
            tokenizer_source(adapter, base_path),
            base_path,
            "--gguf",
        )
    return MergeRun(
        base=base,
        base_path=base_path,
        adapter=adapter,
        peft_model_path=str(adapter.folder),
        layout=layout,
        method=method,
        dtype=DTYPES[str(flags["dtype"])],
        max_bytes=shard_limit(flags["max_shard_size"], base_path),
        output_dir=out,
        device=device,
        verify=flags["verify"],
        trust_remote_code=flags["trust_remote_code"],
        gguf_types=gguf_types,
        companions=companion_sources(adapter, base_path),
    )


def output_folder(output_dir, overwrite, adapter_path):
    """--output_dir resolved, with what an interrupted merge left there cleaned up: outside the adapter folder,
    and new, empty or an earlier merge that --overwrite replaces (platy/outputs.py)."""
    out = Path(output_dir).expanduser().resolve()
    if outputs.never_written(out) is None:  # a protected folder is refused below, before anything is renamed
        remove_stale_partials(out)  # first: a restored previous model must count as what is there
    return outputs.check_output_dir(out, outputs.MERGE, overwrite, [("the adapter folder", adapter_path)])


def merge_method(method, layout):
    """--method decided: auto is dequant for an adapter trained on a quantized base, else peft."""
    if method == "auto":
        method = "dequant" if layout else "peft"
    if method == "dequant" and not layout:
        raise UserError(
            "--method dequant: the adapter's run_config.json records no quantized base (trained without "
            "quantization, or not by finetune.py); use --method peft"
        )
    return method


def check_bitsandbytes(quantization, method, verify):
    """bitsandbytes is there when the merge or --verify needs the base quantized as in training."""
    from platy.modeling import bitsandbytes_missing

    if bitsandbytes_missing(quantization) and (method == "dequant" or verify):
        # dequant rebuilds the quantized base to merge into it; --verify loads it to compare against
        asked, doing, other = (
            ("--method dequant", "rebuilding", "use --method peft")
            if method == "dequant"
            else ("--verify", "loading", "drop --verify")
        )
        raise UserError(
            f"{asked}: the adapter was trained on a {quantization} base, and {doing} it needs bitsandbytes: "
            f"pip install bitsandbytes, or {other}"
        )


def merge_device(device):
    """--device decided: auto is cuda where there is a GPU, else cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU here; use --device cpu")
    return device


def shard_limit(max_shard_size, base_path):
    """--max_shard_size in bytes; auto: the size of the base's largest weight file."""
    if max_shard_size == "auto":
        return max(p.stat().st_size for p in base_checkpoint(base_path, "--base_model"))
    return parse_size(max_shard_size)


def resolve_base(given, recorded):
    """The base to merge into: as given (a note when the adapter was trained on another), else recorded."""
    if not given:
        if not recorded:
            raise UserError("--base_model_name_or_path is required: the adapter records no base model")
        return recorded
    if recorded and not same_model(given, recorded):
        say(f"Note: the adapter was trained on {recorded}; merging into {given} as asked")
    return given


def remove_stale_partials(output_dir):
    """Clean up after a merge that was killed (kill -9, power loss): its process is gone.

    A partial folder is removed. A previous model moved aside (.NAME.old-PID) goes back into
    place if the kill came before the new model arrived, else it is removed.
    """
    for path in sorted(output_dir.parent.glob(f".{output_dir.name}.*")):
        match = re.fullmatch(rf"\.{re.escape(output_dir.name)}\.(partial|old)-(\d+)(-.*)?", path.name)
        if not match or Path(f"/proc/{match[2]}").exists():
            continue
        if match[1] == "old" and not output_dir.exists():
            path.rename(output_dir)
            say(f"Restored {output_dir} from {path}, left by an interrupted merge")
        else:
            say(f"Removing {path}, left by an interrupted merge")
            shutil.rmtree(path, ignore_errors=True)


def same_model(a, b):
    def where(name):
        try:
            path = Path(resolve_base_model(name, "--base_model")).expanduser()
        except UserError:  # a folder that moved: compare names only
            return name
        return path.resolve() if path.exists() else name

    return a == b or where(a) == where(b)


def write_merged(run):
    """The merged model folder, built beside output_dir and swapped into place only when complete."""
    run.output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.output_dir.name}.partial-{os.getpid()}-", dir=run.output_dir.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes a private folder; the model is for everyone who may read here
    try:
        stats = merge_stream(
            run.base_path, run.adapter, run.method, run.layout, run.dtype, tmp, run.max_bytes, run.device
        )
        write_companions(run, tmp, stats)
        swap_into_place(tmp, run.output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"Merged model ({run.method} merge, {run.dtype}): {run.output_dir} "
        f"({len(stats['shards'])} shard(s), {stats['bytes'] / 1e9:.3f} GB, {stats['merged_modules']} modules merged)"
    )
    return stats


GENERATION = "generation_config.json"


def write_companions(run, folder, stats):
    """config.json, generation config, tokenizer, a model card, and how the merge was made."""
    from platy.model_card import model_card

    adapter = run.adapter
    write_json(folder / "config.json", output_config(run.base_path, run.dtype, adapter.vocabulary))
    for name, source in run.companions:
        shutil.copy(source, folder / name)
    write_prompt_format(folder, adapter.record)
    if adapter.record:
        adapter.record.write(folder)
    # every file written so far, companions included: --check finds a changed tokenizer as a changed shard
    checksums = {
        path.name: stats["checksums"].get(path.name) or file_digest(path)
        for path in sorted(folder.iterdir())
        if path.is_file()
    }
    merge_info = {
        "method": run.method,
        "dtype": run.dtype,
        "base_model": run.base,
        "adapter": run.peft_model_path,
        "shards": stats["shards"],
        "checksums": checksums,
        "merged_modules": stats["merged_modules"],
        "quantization_layout": {k: v for k, v in (run.layout or {}).items() if k != "modules"} or None,
        "command": " ".join(["python", "merge.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
    }
    write_json(folder / MERGE_CONFIG, merge_info)
    (folder / "README.md").write_text(model_card(run, adapter, merge_info), encoding="utf-8")


def write_prompt_format(folder, record):
    """The merged tokenizer's chat template is the prompt format the adapter was trained with (its record's
    chat template, or its prompt template written as one), so that apply_chat_template, vLLM, chat clients and
    the GGUF file format prompts as training did; the base's own template would not."""
    from transformers import AutoTokenizer

    from platy.data.examples import adds_bos
    from platy.prompts import format_chat_template, save_chat_template

    fmt = record and record.prompt_format
    if not fmt:
        return
    text = format_chat_template(fmt, adds_bos(AutoTokenizer.from_pretrained(folder)) if not fmt.chat else False)
    if text:
        save_chat_template(folder, text)


def write_gguf_files(run):
    """--gguf: one file per type beside the merged model (each renamed into place when complete), the
    Ollama Modelfile, and their record in merge_config.json and the card."""
    import time

    metadata = gguf_metadata(run)
    written = {}
    for gguf_type in run.gguf_types:
        destination = gguf_export.file_name(run.output_dir, gguf_type)
        started = time.time()
        try:
            info = gguf_export.write_gguf(run.output_dir, gguf_type, destination, metadata)
        except OSError as err:
            done = f" and so are {', '.join(w['file'] for w in written.values())}" if written else ""
            raise Stopped(
                f"writing {destination.name} failed: {err.strerror or err}; the merged model in {run.output_dir} "
                f"is complete{done}. Free disk space and run merge.py again with --overwrite",
                WRITE_FAILED,
            ) from err
        info["seconds"] = round(time.time() - started, 2)
        info["sha256"] = file_digest(destination)["sha256"]
        written[gguf_type] = info
        say(f"GGUF {gguf_type}: {destination} ({info['bytes'] / 1e6:.1f} MB, {info['seconds']:.1f} s)")
    first = written[run.gguf_types[0]]["file"]
    template = gguf_export.ollama_template(run.output_dir)
    stops = gguf_export.stop_tokens(run.output_dir)
    write_text(run.output_dir / "Modelfile", gguf_export.modelfile(first, template, stops))
    update_record(run, gguf=written, modelfile=file_digest(run.output_dir / "Modelfile"))
    return written


def gguf_metadata(run):
    """general.* of the GGUF files: name, base model, license, training data, the toolkit."""
    record = run.adapter.record
    return {
        "name": run.output_dir.name,
        "description": f"{run.base} fine-tuned with LoRA by the Platypus toolkit ({toolkit_version()}), "
        f"{run.method} merge, exported by merge.py",
        "base_model": run.base,
        "license": base_license(run.base_path),
        "data": record.data_path if record else None,
    }


def base_license(base_path):
    """The license the base model's card declares in its front matter (license: ...), or None."""
    card = Path(base_path) / "README.md"
    if not card.is_file():
        return None
    front = card.read_text(encoding="utf-8", errors="replace").split("---")
    for line in (front[1] if len(front) > 2 else "").splitlines():
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def toolkit_version():
    """The toolkit's git commit (it has no release number), or 'unknown version' outside a checkout."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "-C", cli.REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"commit {commit}" if commit else "unknown version"


def update_record(run, **fields):
    """Add fields to merge_config.json and write the model card again from it."""
    from platy.model_card import model_card

    path = run.output_dir / MERGE_CONFIG
    info = json.loads(path.read_text(encoding="utf-8"))
    info.update(fields)
    write_json(path, info)
    write_text(run.output_dir / "README.md", model_card(run, run.adapter, info))
    return info


def check_gguf(run):
    """--verify with --gguf: each file loaded back by transformers' GGUF loader against the merged model."""
    info = json.loads((run.output_dir / MERGE_CONFIG).read_text(encoding="utf-8"))
    written = info["gguf"]
    prompts = [verify_prompter(run).generate_prompt(q) for q in VERIFY_PROMPTS]
    reports = gguf_export.compare_with_merged(
        run.output_dir, {t: w["file"] for t, w in written.items()}, prompts, run.dtype
    )
    for gguf_type, report in reports.items():
        report = gguf_verdict(gguf_type, report)
        worst, agreement = report["tolerance"]["max_abs_diff"], report["tolerance"]["agreement"]
        say(
            f"Verify GGUF {gguf_type}: largest |logit difference| {report['max_abs_diff']:.2e} against the merged "
            f"model (tolerance {worst:.2g} = {report['tolerance']['derivation']}), greedy agreement "
            f"{100 * report['agreement']:.1f}% (at least {100 * agreement:.0f}%), tokenizer ids equal on "
            f"{report['tokenizer_same_ids']}/{report['tokenizer_texts']} texts: {report['verdict']}"
        )
        if report["verdict"] == "WARN":
            say(
                f"Warning: {written[gguf_type]['file']} moves the merged model's logits or greedy tokens more than "
                f"{gguf_type} rounding is allowed to; compare its answers with the merged model's (evaluate.py "
                "--models takes both) before serving it"
            )
        reports[gguf_type] = written[gguf_type]["verify"] = report
    update_record(run, gguf=written)
    return reports


def gguf_verdict(gguf_type, report):
    """check_gguf's report with its tolerance and verdict: PASS when the tokenizer gives the same ids, the
    largest logit difference is within what the type's rounding explains at these logits, and greedy agreement
    holds."""
    floor, agreement, step = GGUF_TOLERANCE[gguf_type]
    scale = report["max_abs_logit"]
    scaled = GGUF_ROUNDINGS * step * scale
    derivation = (
        f"{GGUF_ROUNDINGS} x {gguf_type} step {step:.2g} x max |logit| {scale:.3g}"
        if scaled > floor
        else f"the {gguf_type} floor {floor:g}, above {GGUF_ROUNDINGS} x step {step:.2g} x max |logit| {scale:.3g}"
    )
    tolerance = {"max_abs_diff": max(floor, scaled), "agreement": agreement, "derivation": derivation}
    within = (
        report["tokenizer_same_ids"] == report["tokenizer_texts"]
        and report["max_abs_diff"] <= tolerance["max_abs_diff"]
        and report["agreement"] >= agreement
    )
    return {**report, "verdict": "PASS" if within else "WARN", "tolerance": tolerance}


def verify_prompter(run):
    from platy.prompts import Prompter

    record = run.adapter.record
    template = (record and record.template_name) or "alpaca"
    return Prompter(template, f"--peft_model_path {run.adapter.folder}: its recorded template")


def companion_sources(adapter, base_path):
    """What the merged folder copies beside its weights, as ((name, source file), ...): the generation config
    (the adapter's, which holds a chat template's end-of-turn stops, else the base's), the tokenizer's files
    (tokenizer_source's) and the base's sentencepiece model. Only these names, and only regular files inside
    their folder: a link in a received adapter must not carry a file of this machine (a token, the
    environment) into a model that gets published."""
    base = Path(base_path)
    found = {}
    generation = next((f for f in (adapter.folder, base) if present(f / GENERATION)), None)
    if generation:
        found[GENERATION] = generation
    tokenizer = tokenizer_source(adapter, base)
    found |= {name: tokenizer for name in TOKENIZER_FILES if present(tokenizer / name)}
    if "tokenizer.model" not in found and present(base / "tokenizer.model"):
        # transformers 5 saves tokenizer.json only; llama.cpp's tools and --gguf read the sentencepiece model
        found["tokenizer.model"] = base
    return tuple((name, file_inside(folder, name, adapter)) for name, folder in found.items())


def present(path):
    return path.is_symlink() or path.exists()  # a dangling link too: it is refused, not skipped


def file_inside(folder, name, adapter):
    """folder / name, a regular file inside folder; a UserError naming the flag that gave the folder."""
    flag = "--peft_model_path" if folder == adapter.folder else "--base_model"
    problem = outside_problem(folder, name)
    if problem is None and not (folder / name).is_file():
        problem = f"{name} is not a regular file"
    if problem:
        raise UserError(
            f"{flag} {folder}: {problem}; the merge copies only regular files from inside the folder: "
            f"replace {name} with the file itself"
        )
    return folder / name


def tokenizer_source(adapter, base_path):
    """The tokenizer the merged model gets: the adapter's (saved by finetune.py) or else the base's."""
    return adapter.folder if (adapter.folder / "tokenizer_config.json").is_file() else Path(base_path)


def check_merged(run):
    """--verify: read the written files back against their recorded sha256, then how closely the merged
    model reproduces base + adapter, with its verdict, printed and kept in the folder's merge_config.json and
    model card."""
    files, unchecked = check_written(run.output_dir)
    say(f"Read back {files} from {run.output_dir}: sizes and sha256 as written{not_checked(unchecked)}")
    report = verdict(verify_merge(run), run.dtype)
    limit = report["tolerance"]
    say(
        f"Verify: {report['verdict']}: largest |logit difference| {report['max_abs_diff']:.2e} (tolerance "
        f"{limit['max_abs_diff']:.2g} = {limit['derivation']}), greedy next-token agreement "
        f"{100 * report['agreement']:.1f}% (at least {100 * limit['agreement']:g}%) over {report['positions']} "
        f"positions of {report['prompts']} prompts"
    )
    if report["verdict"] != "PASS":
        hint = (
            " (expected with --method peft for an adapter trained on a quantized base: --method dequant reproduces it)"
            if run.method == "peft" and run.layout
            else ""
        )
        say(f"Warning: the merged model does not reproduce base + adapter within the tolerances{hint}")
    update_record(run, verify=report)
    return report


def verdict(report, dtype):
    """The verify report with its verdict: PASS within the tolerances of the exported dtype, else WARN. The
    logit tolerance scales with the reference's logits (float16 rounds a logit of 30 in steps of 0.016, one of 1
    in steps of 0.001), in the coarser of the exported dtype and the precision the reference computed in (a GPU
    reference in bf16 rounds more than a float16 export)."""
    import torch

    epsilons = {name: torch.finfo(getattr(torch, name)).eps for name in (dtype, report["reference_dtype"])}
    rounding = max(epsilons, key=epsilons.get)
    k, eps, scale = VERIFY_ROUNDINGS[rounding], epsilons[rounding], report["max_abs_logit"]
    computed = f" (the reference computed in {rounding})" if rounding != dtype else ""
    tolerance = {
        "max_abs_diff": k * eps * scale,
        "agreement": VERIFY_AGREEMENT,
        "derivation": f"{k} x {rounding} eps {eps:.2g}{computed} x max |logit| {scale:.3g}",
    }
    within = report["max_abs_diff"] <= tolerance["max_abs_diff"] and report["agreement"] >= tolerance["agreement"]
    return {**report, "verdict": "PASS" if within else "WARN", "dtype": dtype, "tolerance": tolerance}


# what --check cannot hold to a checksum: the record of the checksums itself, and the card --verify rewrites
UNCHECKED = {MERGE_CONFIG: "it holds the checksums", "README.md": "the card, rewritten by --verify"}


def check_written(folder, recorded=MERGE_CONFIG):
    """A merged folder's files against the checksums of its merge_config.json (shards, companions, GGUF files,
    Modelfile) and every safetensors header: ('<n> file(s), <size>', the files not checked, each with why), or
    a UserError naming the first file that differs."""
    folder = Path(folder)
    try:
        checksums = recorded_files(json.loads((folder / recorded).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(
            f"{folder}: {recorded} is missing, damaged or records no checksums; merge again to record them"
        ) from None
    who, fix = f"{folder}", "copy the merged model again, or merge again"
    if problem := records_problem(folder, checksums, listed_in=recorded):
        raise UserError(f"{who}: {problem}; {fix}")
    check_weights(folder, who, fix)
    size = sum(record["size"] for record in checksums.values())
    unchecked = [
        f"{path.name} ({UNCHECKED.get(path.name, 'no checksum recorded')})"
        for path in sorted(folder.iterdir())
        if path.name not in checksums
    ]
    return f"{len(checksums)} file(s), {human_size(size)}", unchecked


def not_checked(unchecked):
    return f"; not checked: {', '.join(unchecked)}" if unchecked else ""


def recorded_files(info):
    """{file name: {size, sha256}} of every file a merge_config.json holds a checksum of: its `checksums`
    (shards, index, config, tokenizer, chat template, run record), each GGUF file and the Modelfile."""
    files = {name: checked_record(record) for name, record in info["checksums"].items()}
    for written in (info.get("gguf") or {}).values():
        files[written["file"]] = checked_record({"size": written["bytes"], "sha256": written["sha256"]})
    if info.get("modelfile"):
        files["Modelfile"] = checked_record(info["modelfile"])
    return files


def checked_record(record):
    """A recorded {size, sha256}, or TypeError when it is not one."""
    if not (isinstance(record["size"], int) and isinstance(record["sha256"], str)):
        raise TypeError
    return record


def check_folder(value):
    """--check FOLDER: a merged model against its merge_config.json, a checkpoint or adapter against its
    manifest, any other model folder by the structure of its safetensors files; one line either way."""
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UserError(f"--check {value}: folder not found; give a merged model, adapter or checkpoint folder")
    if (folder / MERGE_CONFIG).is_file():
        checked, unchecked = check_written(folder)
        say(f"Checked {folder}: {checked}; sizes and sha256 match {MERGE_CONFIG}{not_checked(unchecked)}")
    elif (folder / MANIFEST).is_file():
        if problem := folder_problem(folder):
            raise UserError(f"--check {value}: {problem}; copy the folder again, or use another checkpoint-N")
        say(f"Checked {folder}: every file's size and sha256 match {MANIFEST}")
    else:
        files = check_weights(folder, f"--check {value}", "download or copy the model again")
        if not files:
            raise UserError(f"--check {value}: no safetensors files, {MERGE_CONFIG} or {MANIFEST} to check")
        say(
            f"Checked {folder}: {len(files)} safetensors file(s) whole (headers, byte ranges, sizes); no checksums "
            "are recorded there, so damage inside a tensor cannot be told"
        )


def verify_merge(run, prompts=None):
    """Largest logit difference and greedy agreement: merged model vs base + adapter as trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from platy.modeling import load_model_with_adapter, resolve_precision, torch_dtype
    from platy.quantized import compute_8bit_as_trained, compute_in_fp32

    adapter = run.adapter
    recorded = adapter.record.precision if adapter.record else None
    # the compute precision of training where this machine can run it (a GPU run's bf16 on a GPU)
    precision = recorded if recorded and torch.cuda.is_available() else None
    precision = precision or resolve_precision("auto")
    # a quantized base as training quantized it: from the dtype it was loaded in (the merge replays the same);
    # on a CPU, which computes the reference in fp32, loaded so and then upcast
    loaded = precision
    if not torch.cuda.is_available() and run.layout:
        loaded = {"bfloat16": "bf16", "float16": "fp16"}.get(run.layout.get("load_dtype"), precision)
    placement = "auto" if torch.cuda.is_available() else {"": "cpu"}
    reference = load_model_with_adapter(
        run.base_path,
        adapter.trained_quantization(),
        loaded,
        adapter.folder,
        "--peft_model_path",
        bool((run.layout or {}).get("double_quant")),
        run.trust_remote_code,
        placement,
        base_flag="--base_model",
        vocabulary=adapter.vocabulary,
    )
    merged = AutoModelForCausalLM.from_pretrained(
        str(run.output_dir),
        dtype=getattr(torch, run.dtype),
        device_map=placement,
        trust_remote_code=run.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(run.output_dir))
    prompts = prompts or [verify_prompter(run).generate_prompt(q) for q in VERIFY_PROMPTS]
    if loaded != precision:
        compute_in_fp32(reference)
    reference.eval()
    compute_8bit_as_trained(reference)
    merged.eval()
    worst, agree, positions, largest = 0.0, 0, 0, 0.0
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt")
            a = reference(**ids.to(reference.device)).logits.float()
            b = merged(**ids.to(merged.device)).logits.float().to(a.device)
            worst = max(worst, (a - b).abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += a.shape[1]
            largest = max(largest, a.abs().max().item())
    return {
        "max_abs_diff": worst,
        "agreement": agree / positions,
        "positions": positions,
        "prompts": len(prompts),
        "max_abs_logit": largest,  # the scale the tolerance is relative to
        "reference_dtype": str(torch_dtype(precision)).removeprefix("torch."),
    }
