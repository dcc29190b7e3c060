"""One evaluate.py run: the flag check, the models and suite resolved, each model run through
lm-evaluation-harness, the tables written.

Which harness number goes in which cell, and how tables are laid out, is platy.evaluation's.
"""

import functools
import gc
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from platy import cli
from platy.base_weights import offline_when_unreachable
from platy.cli import UserError, error_detail, say
from platy.evaluation import (
    SUITES,
    answer_rows,
    custom_suite,
    folder_name,
    model_labels,
    render_answers,
    render_tables,
    scores_json,
    shots_title,
    with_shots,
)
from platy.files import write_json, write_text
from platy.reporting import library_versions, say_configuration

INSTALL_HINT = "lm-eval is not installed; install it with: pip install -r requirements-eval.txt"
DEVICES = ("auto", "cpu", "cuda", "mps")
CPU_BATCH_SIZE = 8


def require_harness():
    """lm-eval is an optional dependency: without it, say how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "lm_eval":
            raise  # installed, but one of its own dependencies is missing: the traceback says which
        raise UserError(INSTALL_HINT) from err


def check_flags(flags):
    """Every problem of evaluate.py's flag values, as sentences; no I/O (folders, devices, models and
    tasks are resolve's, which adds its problems to these)."""
    problems = []
    parse_shots(flags["num_fewshot"], problems)
    check_numbers(flags, problems)
    if flags["device"] not in DEVICES and not str(flags["device"]).startswith("cuda:"):
        problems.append(f"--device {flags['device']}: choose {', '.join(DEVICES)} or cuda:N")
    if flags["trust_task_code"] and not flags["include_path"]:
        problems.append("--trust_task_code vouches for the task folder --include_path names: give that too")
    if flags["fewshot_as_multiturn"] is not None and not flags["apply_chat_template"]:
        problems.append(
            f"--fewshot_as_multiturn {flags['fewshot_as_multiturn']}: turns exist only in a chat template; "
            "add --apply_chat_template True or drop the flag"
        )
    return problems


def check_chat_templates(models, problems):
    """With --apply_chat_template, every local model (or its adapter) has a chat template to apply: its
    tokenizer's, or the prompt format its run record holds."""
    for model in models:
        folder = Path(tokenizer_folder(model))
        if folder.is_dir() and not has_chat_template(folder) and not recorded_format(model):
            problems.append(
                f"--apply_chat_template: {model['spec']} has no chat template ({folder} holds none); train with "
                "finetune.py --chat_template, or drop --apply_chat_template"
            )


def tokenizer_folder(model):
    """Where a model's tokenizer is: an adapter's own folder when finetune.py saved one there (a chat template,
    added tokens), else the base's."""
    adapter = model["adapter"]
    if adapter and (adapter.folder / "tokenizer_config.json").is_file():
        return str(adapter.folder)
    return model["base_path"]


def recorded_format(model):
    """How a model's prompts were rendered in training (the PromptFormat of its adapter's record, or of the one
    a merged folder carries), or None for a model the toolkit did not train."""
    from platy.record import RunRecord

    if model["adapter"]:
        record = model["adapter"].record
    else:
        folder = Path(model["spec"]).expanduser()
        record = RunRecord.read(folder) if folder.is_dir() else None
    return record and record.prompt_format


def follow_recorded_format(lm, model):
    """With --apply_chat_template, the harness renders a model's prompts with the format it was trained with:
    its recorded chat template, or its prompt template written as one; the tokenizer's own (a base's) is used
    only for a model without a record."""
    from platy.data.examples import adds_bos
    from platy.prompts import format_chat_template

    fmt = recorded_format(model)
    text = fmt and format_chat_template(fmt, adds_bos(lm.tokenizer))
    if text:
        lm.tokenizer.chat_template = text
        say(f"{model['label']}: prompts laid out with {fmt.describe()}, as in training (its run_config.json)")


def fewshot_turns(flags):
    """Whether the harness gives few-shot examples as earlier turns: with a chat template, unless turned off."""
    return bool(flags["apply_chat_template"]) and flags["fewshot_as_multiturn"] is not False


def has_chat_template(folder):
    """Whether a tokenizer folder carries a chat template (chat_template.jinja or in tokenizer_config.json)."""
    import json

    from platy.prompts import CHAT_TEMPLATE_FILE

    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def prompt_format(flags):
    """How the prompts were formatted, for the tables' heading ('' for the harness's plain prompts)."""
    parts = []
    if flags["apply_chat_template"]:
        parts.append("each model's chat template (--apply_chat_template)")
        turns = fewshot_turns(flags)
        parts.append("few-shot examples as earlier turns" if turns else "few-shot examples in one user turn")
    if flags["system_instruction"]:
        parts.append(f"system instruction {flags['system_instruction']!r}")
    return f"Prompts: {'; '.join(parts)}.\n\n" if parts else ""


def check_folders(flags, problems):
    include = Path(flags["include_path"]).expanduser() if flags["include_path"] else None
    if include and not include.is_dir():
        problems.append(f"--include_path {flags['include_path']}: folder not found")
    elif include and not flags["trust_task_code"] and (code := task_code(include)):
        more = f" (and {len(code) - 1} more)" if len(code) > 1 else ""
        problems.append(
            f"--include_path {flags['include_path']}: {code[0]}{more}: code that lm-eval runs when it loads the "
            "task; read it, and pass --trust_task_code if you trust the folder and where it came from"
        )
    output_dir = Path(flags["output_dir"]).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        problems.append(f"--output_dir {output_dir} is a file; give a folder")


# a Jinja expression that reaches a dunder attribute: the way out of the harness's unsandboxed templates
JINJA_DUNDER = re.compile(r"\{[{%](?:(?![}%]\}).)*__", re.DOTALL)


def task_code(include):
    """Where the task YAML of an --include_path folder names code (each as 'FILE: ...'): a tag such as
    !function (lm-eval imports the module it names and runs it), or a template reaching Python internals;
    the files they include are read too, wherever they are. [] for a folder of data and plain templates."""
    import yaml

    found, seen = [], set()

    class Loader(yaml.SafeLoader):
        """Reads a task file without running anything, noting every tag the harness would construct."""

    def note_tag(loader, tag, node):
        found.append(f"{where}: !{tag} {getattr(node, 'value', '')}".rstrip())

    Loader.add_multi_constructor("!", note_tag)
    pending = sorted(include.glob("**/*.yaml"))
    while pending:
        path = pending.pop(0).resolve()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        where = path.relative_to(include.resolve()) if path.is_relative_to(include.resolve()) else path
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - a safe loader
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # the harness skips a file it cannot read
        if not isinstance(config, dict):
            continue
        templates = [v for v in config.values() if isinstance(v, str) and JINJA_DUNDER.search(v)]
        found += [f"{where}: a template reaching Python internals ({t[:60]!r})" for t in templates]
        includes = config.get("include") or []
        for name in includes if isinstance(includes, list) else [includes]:
            if isinstance(name, str):
                pending.append(path.parent / name)
    return found


@dataclass(frozen=True)
class EvalRun:
    """One evaluate.py run: the models in row order, the suite, and where and how they run."""

    flags: dict
    models: list  # one dict per --models entry (spec, label, folder, base, base_path, adapter, quantization...)
    suite: object  # platy.evaluation.Suite
    notes: list  # what --num_fewshot changed, printed with the configuration
    task_manager: object
    device: str
    precision: str
    batch_size: object  # an int, or "auto" on CUDA
    output_dir: Path
    include: Path | None  # --include_path: where local tasks and their relative data_files are
    limit: float | None
    trust_remote_code: bool


def resolve(flags, problems):
    """The EvalRun: every model's adapter, base and config read, the suite's tasks found and built.

    Fails once with the flag problems given and every model and task problem found, before any
    weights load: a typo in the fifth model must not wait for the first four to be evaluated.
    """
    shot_counts = parse_shots(flags["num_fewshot"], [])
    include = Path(flags["include_path"]).expanduser().resolve() if flags["include_path"] else None
    bundled = SUITES.get(flags["suite"])
    if include is None and bundled is not None and bundled.include is not None:
        include = bundled.include  # a bundled suite's tasks are read from the toolkit's own folder
    offline_when_unreachable()
    check_device(flags["device"], problems)
    check_folders(flags, problems)
    models = resolve_models(flags, problems)
    if flags["apply_chat_template"]:
        check_chat_templates(models, problems)
    usable = include if include and include.is_dir() else None
    suite, notes = resolve_suite(flags["suite"], shot_counts, usable, problems, flags["include_path"])
    cli.fail_on(problems)
    device, precision, batch_size = resolve_placement(flags["device"], flags["batch_size"])
    return EvalRun(
        flags=flags,
        models=models,
        suite=suite,
        notes=notes,
        task_manager=load_tasks(suite, include),
        device=device,
        precision=precision,
        batch_size=batch_size,
        output_dir=Path(flags["output_dir"]).expanduser().resolve(),
        include=include,
        limit=flags["limit"],
        trust_remote_code=flags["trust_remote_code"],
    )


def parse_shots(value, problems):
    if value is None:
        return []
    items = [item.strip() for item in str(value).strip("[]() ").split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        problems.append(f"--num_fewshot {value}: give a shot count such as 5, or several such as 0,5,10")
        return []
    return list(dict.fromkeys(int(item) for item in items))


def check_numbers(flags, problems):
    limit = flags["limit"]
    if limit is not None and (
        isinstance(limit, bool)
        or not isinstance(limit, (int, float))
        or limit <= 0
        or (limit >= 1 and limit != int(limit))
    ):
        problems.append(f"--limit {limit}: give a number of examples (a positive integer) or a fraction below 1")
    shown = flags["show_answers"]
    if isinstance(shown, bool) or not isinstance(shown, int) or shown < 0:
        problems.append(f"--show_answers {shown}: give how many prompts to show (0: none)")
    batch = str(flags["batch_size"])
    if not (batch == "auto" or batch.isdigit() and int(batch) > 0):
        problems.append(f"--batch_size {batch}: give auto or a positive integer")


def resolve_models(flags, problems):
    """Each --models entry as a base path (and adapter), with its row label and how it loads."""
    from platy.base_weights import resolve_base_model
    from platy.merging import Adapter
    from platy.modeling import bitsandbytes_missing, loading_quantization

    specs = [spec.strip() for spec in str(flags["models"] or "").split(",") if spec.strip()]
    if not specs:
        problems.append("--models is required: model folders, hub ids or adapter folders, separated by commas")
        return []
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        problems.append(f"--models names {', '.join(repeated)} more than once")
    labels = model_labels(specs)
    folders = unique_folders(labels)
    models = []
    for spec, label, folder in zip(specs, labels, folders):
        try:
            path = Path(spec).expanduser()
            adapter = Adapter(path, "--models", merge=False) if (path / "adapter_config.json").is_file() else None
            gguf = path.name if path.suffix == ".gguf" and path.is_file() else None
            if gguf:  # merge.py --gguf's file: read by transformers from the merged folder it was written in
                base, base_path = spec, resolve_base_model(str(path.parent), f"--models {spec}: its folder")
            elif adapter:
                base = adapter.base_model()
                if not base:
                    raise UserError(
                        f"--models {spec}: the adapter records no base model (no run_config.json or "
                        "base_model_name_or_path); evaluate a merged model instead"
                    )
                base_path = resolve_base_model(base, f"--models {spec}: its base model")
            else:
                base, base_path = spec, resolve_base_model(spec, "--models")
        except UserError as err:
            problems.append(str(err))
            continue
        if adapter and flags["trust_remote_code"]:
            # the base and tokenizer an adapter brings are data from whoever sent it, never code to run
            problems.append(
                f"--models {spec}: --trust_remote_code would run the code of the base its run_config.json names "
                f"({base}) and of its tokenizer; merge it with merge.py --base_model <the base> and evaluate the "
                "merged folder, or drop --trust_remote_code"
            )
            continue
        # as trained: the scores are those of the trained adapter (and of merge.py's dequant merge)
        quantization, as_trained = loading_quantization(adapter, flags["load_4bit"])
        if bitsandbytes_missing(quantization):
            problems.append(
                f"--models {spec}: loading it in {quantization}{' as trained' if as_trained else ''} needs "
                "bitsandbytes: pip install bitsandbytes, or load it unquantized with --load_4bit False"
            )
            continue
        models.append(
            {
                "spec": spec,
                "gguf_file": gguf,
                "label": label,
                "folder": folder,
                "base": base,
                "base_path": base_path,
                "adapter": adapter,
                "quantization": quantization,
                "as_trained": as_trained,
            }
        )
    check_configs(models, flags["trust_remote_code"], problems)
    return models


def unique_folders(labels):
    folders = []
    for label in labels:
        name, n = folder_name(label), 2
        while name in folders:
            name, n = f"{folder_name(label)}-{n}", n + 1
        folders.append(name)
    return folders


def check_configs(models, trust_remote_code, problems):
    """Every model's config loads (a hub id that does not exist or cannot be reached fails here, before any
    model is evaluated)."""
    from platy.modeling import load_config

    for model in models:
        try:
            load_config(model["base_path"], trust_remote_code, flag=base_flag(model))
        except UserError as err:
            problems.append(str(err))


def base_flag(model):
    """How messages about a model's base name it: an adapter's base is not on the command line."""
    return f"--models {model['spec']}: its base model" if model["adapter"] else "--models"


def resolve_suite(name, shot_counts, include, problems, include_flag=None):
    """The suite definition (published or from a task list), and notes on what --num_fewshot changed.
    include_flag: --include_path as given, for messages."""
    notes = []
    if name in SUITES:
        suite = SUITES[name]
        if shot_counts:
            if not suite.per_task and len(shot_counts) > 1:
                problems.append(
                    f"--num_fewshot {','.join(map(str, shot_counts))}: the {name} table holds one shot "
                    "count per column; give one number"
                )
                return suite, notes
            published = (
                ", ".join(map(str, suite.shot_counts()))
                if suite.per_task
                else ", ".join(f"{s.title} {s.shots}" for s in suite.scores)
            )
            notes.append(
                f"Note: --num_fewshot {','.join(map(str, shot_counts))} replaces the published shots of "
                f"{name} ({published}): the scores are not comparable with published tables"
            )
            suite = with_shots(suite, shot_counts)
        return suite, notes
    tasks = [task.strip() for task in str(name).split(",") if task.strip()]
    if not tasks:
        problems.append("--suite is empty: give openllm, kobest or harness task names")
        return None, notes
    unknown = unknown_tasks(tasks, include)
    for task in unknown:
        import difflib

        close = difflib.get_close_matches(task, list(SUITES) + known_task_names(include), n=1)
        hint = f"did you mean {close[0]}?" if close else "list the harness's tasks with: lm-eval ls tasks"
        problems.append(
            f"--suite: unknown suite or task {task}; {hint} (suites: {', '.join(SUITES)}"
            + (f"; local tasks from --include_path {include_flag}" if include else "")
            + ")"
        )
    return custom_suite(tasks, shot_counts), notes


@functools.cache
def task_manager(include, defaults):
    """lm-eval's task index. Indexing its ~15,000 built-in tasks takes seconds, so local tasks are indexed
    alone first and the built-in ones only when needed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None, include_defaults=defaults)


def manager_for(tasks, include):
    if include is not None:
        local = task_manager(include, defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return task_manager(include, defaults=True)


def unknown_tasks(tasks, include):
    known = set(manager_for(tasks, include).all_tasks)
    return [task for task in tasks if task not in known]


def known_task_names(include):
    return list(task_manager(include, defaults=True).all_tasks)


def check_device(device, problems):
    """A device named on the command line must be on this machine (its name is check_flags's)."""
    import torch

    from platy.modeling import mps_available

    if device not in DEVICES and not str(device).startswith("cuda:"):
        return
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {device}: no CUDA GPU here; use --device cpu (or auto)")
    elif device == "mps" and not mps_available():
        problems.append("--device mps: Apple's mps is not available here; use --device cpu (or auto)")


def resolve_placement(device, batch_size):
    """Device, precision and batch size; 'auto' batch sizes are searched only on CUDA GPUs."""
    from platy.modeling import generation_device

    device, precision = generation_device(device)
    if batch_size == "auto":
        # the harness's search runs batches of full-length sequences (64 x the context length):
        # minutes on a CPU for a generation task, where memory never runs out to stop it
        batch_size = "auto" if device.startswith("cuda") else CPU_BATCH_SIZE
    return device, precision, int(batch_size) if batch_size != "auto" else "auto"


def task_data_folder(include):
    """Where the harness reads a task's relative data_files: the --include_path folder (its tasks' own folder),
    so the command runs from any working directory; the working directory without one."""
    import contextlib

    return contextlib.chdir(include) if include else contextlib.nullcontext()


def load_tasks(suite, include):
    """Build every task once (its data downloaded or read from the cache) before any model loads, so a
    missing data set stops the run before hours of evaluation."""
    manager = manager_for(suite.tasks(), include)
    problems, hints = [], {}
    for task in suite.tasks():
        try:
            with task_data_folder(include):
                manager.load([task])
        except Exception as err:  # noqa: BLE001 - building a task fails in many ways, all about its data
            problems.append(f"{task} ({type(err).__name__}: {error_detail(err)[:160]})")
            if isinstance(err, FileNotFoundError):
                hints["files"] = (
                    f"A task's relative data_files are read from {include or Path.cwd()} "
                    f"({'the --include_path folder' if include else 'the working directory'}): put them there "
                    "or give absolute paths"
                )
            if isinstance(err, ConnectionError):
                hints["hub"] = (
                    "Offline, a task's data set must be in the Hugging Face cache (downloaded once "
                    "online), or use local tasks with --include_path"
                )
                break  # the hub is out of reach: every further task would wait through the same retries
    if problems:
        raise UserError(f"cannot load task {'; '.join(problems)}" + "".join(f". {h}" for h in hints.values()))
    return manager


def describe_run(run):
    """The evaluation configuration: printed once at start, saved as eval_config.json at the end."""
    suite = run.suite
    resolved = {
        "tasks": suite.tasks(),
        "shots": suite.shot_counts(),
        "device": run.device,
        "precision": run.precision,
        "batch_size": run.batch_size,
    }
    say_configuration("Evaluation configuration", {**run.flags, **resolved})
    for model in run.models:
        source = f"adapter {model['spec']} on {model['base']}" if model["adapter"] else model["spec"]
        load = "unquantized" if model["quantization"] == "none" else model["quantization"]
        say(f"  {model['label']}: {source} ({load}{', as trained' if model['as_trained'] else ''})")
    for note in run.notes:
        say(note)
    models = [
        {k: v for k, v in m.items() if k != "adapter"} | {"adapter": str(m["adapter"].folder) if m["adapter"] else None}
        for m in run.models
    ]
    return {
        "flags": run.flags,
        "resolved": {**resolved, "models": models, "suite": [vars(s) for s in suite.scores]},
        "command": " ".join(["python", "evaluate.py", *sys.argv[1:]]),
        "versions": library_versions(extra=("lm_eval",)),
    }


# harness messages that restate what this script asked for
HARNESS_CHATTER = ("Overwriting default num_fewshot", "is not of type `str`", "Passed an already-initialized model")


class DropChatter(logging.Filter):
    def filter(self, record):
        return not any(text in record.getMessage() for text in HARNESS_CHATTER)


def quiet_harness():
    for name in ("lm_eval.evaluator", "lm_eval.models.huggingface"):
        logging.getLogger(name).addFilter(DropChatter())


def evaluate_model(model, run):
    """Load one model, run the suite's tasks at each shot count, save each harness result."""
    from lm_eval import simple_evaluate

    suite = run.suite
    say(f"\n== {model['label']}")
    lm, model_args = load_lm(model, run)
    if run.flags["apply_chat_template"]:
        follow_recorded_format(lm, model)
    runs = {}
    folder = run.output_dir / model["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for shots in suite.shot_counts():
            tasks = list(dict.fromkeys(s.task for s in suite.scores if s.shots == shots))
            say(f"{model['label']}: {', '.join(tasks)} ({shots_title(shots)})")
            with task_data_folder(run.include):
                results = simple_evaluate(
                    model=lm,
                    tasks=tasks,
                    num_fewshot=shots,
                    limit=run.limit,
                    task_manager=run.task_manager,
                    log_samples=bool(run.flags["show_answers"]),
                    apply_chat_template=run.flags["apply_chat_template"],
                    fewshot_as_multiturn=fewshot_turns(run.flags),
                    system_instruction=run.flags["system_instruction"],
                )
            # the harness records model_args only when it builds the model itself, and its prompt format
            # only through an evaluation tracker
            results["config"]["model_args"] = model_args
            results["config"].update(prompting(lm, run.flags))
            name = "default" if shots is None else shots
            if "samples" in results:  # every answer in a file of its own; the first few stay for the report
                write_json(folder / f"{name}-shot-samples.json", results["samples"])
                shown = run.flags["show_answers"]
                results["samples"] = {task: rows[:shown] for task, rows in results["samples"].items()}
            write_json(folder / f"{name}-shot.json", results)
            runs[shots] = results
    finally:
        del lm  # the next model loads where this one was
        free_memory()
    return runs


def prompting(lm, flags):
    """How the harness formatted this model's prompts, as its evaluation tracker would record it."""
    chat = bool(flags["apply_chat_template"])
    return {
        "system_instruction": flags["system_instruction"],
        "chat_template": lm.chat_template(True) if chat else None,
        "fewshot_as_multiturn": fewshot_turns(flags),
    }


def load_lm(model, run):
    """The harness's Hugging Face model: built by the harness from a path (adapters through its peft
    argument); a quantized model is loaded here, since transformers 5 takes no load_in_4bit flag, and so is
    an adapter that grew the vocabulary (its base gets the new embedding rows first)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from platy.modeling import torch_dtype

    adapter = model["adapter"]
    tokenizer = tokenizer_folder(model)
    dtype = str(torch_dtype(run.precision)).removeprefix("torch.")
    several_gpus = run.device == "cuda" and torch.cuda.device_count() > 1
    common = {
        "tokenizer": tokenizer,
        "batch_size": run.batch_size,
        "trust_remote_code": run.trust_remote_code,
    }
    model_args = {"pretrained": model["base_path"], "dtype": dtype, "device": run.device, **common}
    if model.get("gguf_file"):  # dequantized by transformers: scores of the file's own rounding
        model_args["gguf_file"] = model["gguf_file"]
    if adapter:
        model_args["peft"] = str(adapter.folder)
    vocabulary = adapter.vocabulary if adapter else None
    if model["quantization"] == "none" and not vocabulary:
        model_args["parallelize"] = several_gpus  # a model too big for one GPU is spread over all of them
        try:
            return HFLM(**model_args), model_args
        except (OSError, ValueError) as err:
            raise UserError(f"--models {model['spec']}: cannot load the model ({error_detail(err)})") from err
    from platy.modeling import load_model_with_adapter

    placement = "auto" if several_gpus else {"": run.device}
    weights = load_model_with_adapter(
        model["base_path"],
        model["quantization"],
        run.precision,
        adapter and adapter.folder,
        "--models",
        trust_remote_code=run.trust_remote_code,
        placement=placement,
        base_flag=base_flag(model),
        vocabulary=vocabulary,
    )
    return HFLM(pretrained=weights, **common), {**model_args, "quantization": model["quantization"]}


def free_memory():
    import torch

    from platy.base_weights import release_freed_memory

    gc.collect()
    release_freed_memory()  # glibc keeps a freed model's pages otherwise: two models in memory on CPU
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(run, runs_by_model, eval_config):
    suite = run.suite
    tables = prompt_format(run.flags) + render_tables(suite, runs_by_model)
    if run.limit is not None:
        tables += (
            f"\nScores on the first {run.limit} examples of each task (--limit): not comparable with published ones.\n"
        )
    out = run.output_dir
    write_text(out / "results.md", tables)
    write_json(out / "scores.json", scores_json(suite, runs_by_model))
    write_json(out / "eval_config.json", eval_config)
    say("")
    print(tables, end="", flush=True)
    if run.flags["show_answers"]:
        print(answers_text(suite, runs_by_model, run.flags["show_answers"]), end="", flush=True)
    say(f"\nTables: {out / 'results.md'}; harness results: {out}/<model>/<shots>-shot.json")


def answers_text(suite, runs_by_model, count):
    """Each task's first prompts with every model's answer, at the task's first shot count."""
    blocks = []
    for score in suite.scores:
        samples = {
            label: runs[score.shots]["samples"][score.task]
            for label, runs in runs_by_model.items()
            if score.task in runs.get(score.shots, {}).get("samples", {})
        }
        if samples:
            blocks.append(render_answers(score.task, answer_rows(samples, count)))
    return "\n" + "\n".join(dict.fromkeys(blocks))
