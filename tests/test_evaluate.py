"""evaluate.py: suites against the published tables, table layout, the harness end to end, bad input."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from platy.evaluation import KOBEST, OPENLLM, average, format_value, render_tables

from conftest import REPO, assert_user_error, merge_cli, run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEEDS = FIXTURES / "seeds"  # the published model cards' evaluation tables (headings and tables only)
TASKS = FIXTURES / "eval_tasks"  # local tasks in lm-eval's YAML format; data_files are relative to this folder


def table_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip().startswith("|")]


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def numbers(text):
    """Every score cell of the Markdown tables in a text (NaN and the model column left out)."""
    return [cell for line in table_lines(text) for cell in cells(line)[1:] if re.fullmatch(r"-?\d+(\.\d+)?", cell)]


def harness_yaml(relative):
    """A task file of the installed harness, read without running its !function tags."""
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / relative).read_text(), Loader=Loader)


# ---- suites against the published tables ---------------------------------------------------------------


def test_openllm_suite_matches_the_published_leaderboard_table():
    platyi = (SEEDS / "platyi_34b.md").read_text()
    header = next(line for line in table_lines(platyi) if line.startswith("| Model |"))
    assert cells(header)[:2] == ["Model", "Average"]
    assert [s.title for s in OPENLLM.scores] == cells(header)[2:]
    rendered = render_tables(OPENLLM, {"m": {}}).splitlines()
    assert rendered[0] == header, "the same header line as the published table"

    # shots as the cards state them ("ARC (25-shot)"), and as the harness's own leaderboard group sets them
    dolphin = (SEEDS / "dolphin_orca_platypus_70b.md").read_text()
    published_shots = {name: int(n) for name, n in re.findall(r"\| (\w+) \((\d+)-shot\)", dolphin)}
    assert set(published_shots) == {"ARC", "HellaSwag", "MMLU", "TruthfulQA"}
    ours = {s.title: s.shots for s in OPENLLM.scores}
    assert {k: ours[k] for k in published_shots} == published_shots
    group = {entry["task"]: entry["num_fewshot"] for entry in harness_yaml("benchmarks/openllm.yaml")["task"]}
    for score in OPENLLM.scores:
        name = "truthfulqa" if score.task.startswith("truthfulqa") else score.task
        assert group[name] == score.shots, score
    assert harness_yaml("truthfulqa/truthfulqa_mc2.yaml")["task"] == "truthfulqa_mc2"
    assert [s.metric for s in OPENLLM.scores] == ["acc_norm", "acc_norm", "acc", "acc", "acc", "exact_match"]
    gsm8k_filters = [f["name"] for f in harness_yaml("gsm8k/gsm8k.yaml")["filter_list"]]
    assert OPENLLM.scores[-1].filter in gsm8k_filters

    # the published Average is the plain mean of the six (PlatYi) or of the four shown (Dolphin)
    for line in table_lines(platyi)[2:]:
        row = [float(x) for x in cells(line)[1:]]
        assert average(row[1:]) == pytest.approx(row[0], abs=0.006), line
    values = [float(v) for v in re.findall(r"\(\d+-shot\)\s*\|\s*([\d.]+)", dolphin)]
    assert statistics.mean(values) == pytest.approx(float(re.search(r"Avg\.\s*\|\s*([\d.]+)", dolphin)[1]), abs=0.006)

    # percentages with two decimals, as published
    published = numbers(platyi)
    assert published and all(re.fullmatch(r"\d{2}\.\d{2}", v) for v in published)
    assert format_value(0.657, OPENLLM.percent) == "65.70"


@pytest.mark.parametrize("card", ["kot_platypus2_7b.md", "ko_platypus2_13b.md"])
def test_kobest_suite_matches_the_published_tables(card):
    text = (SEEDS / card).read_text()
    headings = re.findall(r"^### (\w+) \((\w+)\)", text, flags=re.MULTILINE)
    titles = list(dict.fromkeys(s.title for s in KOBEST.scores))
    assert [title for title, _ in headings] == titles
    assert {metric for _, metric in headings} == {"F1"}
    assert [KOBEST.heading(t) for t in titles] == [f"### {t} ({m})" for t, m in headings]
    # the task names of the command the card ran
    command_tasks = re.search(r"--tasks (\S+)", text)[1].split(",")
    assert sorted(command_tasks) == sorted(KOBEST.tasks())
    assert all(s.task == f"kobest_{s.title.lower()}" for s in KOBEST.scores)
    headers = {line for line in table_lines(text) if line.startswith("| Model |")}
    assert len(headers) == 1, "every KoBEST table has the same shot columns"
    (header,) = headers
    assert [f"{n}-shot" for n in KOBEST.shot_counts()] == cells(header)[1:]
    assert render_tables(KOBEST, {"m": {}}).splitlines()[1] == header
    # macro F1: the harness's kobest tasks average F1 over the classes
    for task in KOBEST.tasks():
        f1 = [m for m in harness_yaml(f"kobest/{task}.yaml")["metric_list"] if m["metric"] == "f1"]
        assert f1 and f1[0]["average"] == "macro", task
    assert {s.metric for s in KOBEST.scores} == {"f1"}
    # fractions with four decimals, as published (a few cells there carry six)
    decimals = statistics.mode(len(v.split(".")[1]) for v in numbers(text))
    assert decimals == 4 and re.fullmatch(r"0\.\d{4}", format_value(0.75174, KOBEST.percent))


# ---- tables from harness results -----------------------------------------------------------------------


def run(results, group_subtasks=None):
    return {"results": results, "group_subtasks": group_subtasks or {}}


def leaderboard_runs(arc_norm, mmlu_subjects, gsm8k_strict):
    """Harness results as simple_evaluate returns them, one per shot count, with decoys next to the right
    metrics: acc beside acc_norm, flexible-extract beside strict-match, the weighted MMLU group score."""
    mmlu = {"mmlu": {"acc,none": 0.99}, "mmlu_stem": {"acc,none": 0.98}}
    mmlu.update({name: {"acc,none": value, "acc_stderr,none": 0.01} for name, value in mmlu_subjects.items()})
    names = list(mmlu_subjects)
    return {
        25: run({"arc_challenge": {"acc,none": 0.11, "acc_norm,none": arc_norm, "acc_norm_stderr,none": 0.02}}),
        10: run({"hellaswag": {"acc,none": 0.12, "acc_norm,none": 0.85}}),
        5: run(
            {
                **mmlu,
                "winogrande": {"acc,none": 0.75},
                "gsm8k": {"exact_match,strict-match": gsm8k_strict, "exact_match,flexible-extract": 0.13},
            },
            {"mmlu": ["mmlu_stem", names[-1]], "mmlu_stem": names[:-1]},
        ),
        0: run({"truthfulqa_mc2": {"acc,none": 0.5}}),
    }


def test_leaderboard_table_reads_the_right_metrics_and_averages_them():
    runs = {
        "Llama-2-tiny": leaderboard_runs(0.65, {"mmlu_a": 0.5, "mmlu_b": 0.9, "mmlu_c": 0.8}, 0.40),
        "Platypus-tiny": leaderboard_runs(0.70, {"mmlu_a": 0.6, "mmlu_b": 0.6, "mmlu_c": 0.9}, 0.0),
    }
    lines = render_tables(OPENLLM, runs).splitlines()
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- | --- |"
    # MMLU: the mean of the three subjects (0.7333), not the group's weighted 0.99
    # Average: (65 + 85 + 73.333 + 50 + 75 + 40) / 6
    assert lines[2] == "| Llama-2-tiny | 64.72 | 65.00 | 85.00 | 73.33 | 50.00 | 75.00 | 40.00 |"
    assert lines[3] == "| Platypus-tiny | 58.33 | 70.00 | 85.00 | 70.00 | 50.00 | 75.00 | 0.00 |"
    assert len(lines) == 4, "base and fine-tuned model in one table"

    runs["Platypus-tiny"][0] = run({})  # a run that lacks a score: shown, and no average over fewer
    row = cells(render_tables(OPENLLM, runs).splitlines()[3])
    assert row[1] == "n/a" and row[5] == "n/a"


def test_kobest_tables_have_one_table_per_task_and_shots_as_columns():
    def runs(offset):
        return {
            shots: run({task: {"acc,none": 0.1, "f1,none": offset + shots / 1000} for task in KOBEST.tasks()})
            for shots in (0, 5, 10, 50)
        }

    text = render_tables(KOBEST, {"polyglot-ko": runs(0.5), "KO-Platypus": runs(0.6)})
    blocks = text.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [
        "### COPA (F1)",
        "### HellaSwag (F1)",
        "### BoolQ (F1)",
        "### SentiNeg (F1)",
    ]
    assert blocks[0].splitlines()[3:] == [
        "| polyglot-ko | 0.5000 | 0.5050 | 0.5100 | 0.5500 |",
        "| KO-Platypus | 0.6000 | 0.6050 | 0.6100 | 0.6500 |",
    ]


def test_num_fewshot_with_a_published_suite_says_what_it_replaces():
    from platy.evaluate_stages import resolve_suite

    problems = []
    suite, notes = resolve_suite("openllm", [0], None, problems)
    assert {s.shots for s in suite.scores} == {0} and not problems
    assert "replaces the published shots of openllm (ARC 25, HellaSwag 10, MMLU 5" in notes[0]
    suite, notes = resolve_suite("kobest", [0, 5], None, problems)
    assert suite.shot_counts() == [0, 5] and len(suite.tasks()) == 4 and "(0, 5, 10, 50)" in notes[0]
    resolve_suite("openllm", [0, 5], None, problems)
    assert problems == ["--num_fewshot 0,5: the openllm table holds one shot count per column; give one number"]


# ---- the harness end to end ---------------------------------------------------------------------------


# one thread: a tiny model gains nothing from more, and CI machines run tests side by side
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def evaluate_cli(*args, env=None):
    return run_cli(
        [sys.executable, str(REPO / "evaluate.py"), *map(str, args)], cwd=TASKS, env={**OFFLINE, **(env or {})}
    )


@pytest.fixture(scope="module")
def merged(tmp_path_factory, lora_adapter, qlora_adapter):
    """float32 merges of both adapters: what the unmerged evaluations must reproduce."""
    out = tmp_path_factory.mktemp("merged")
    for adapter, name in ((lora_adapter, "lora-merged"), (qlora_adapter, "qlora-merged")):
        result = merge_cli(adapter, out / name, "--dtype", "float32")
        assert result.returncode == 0, result.stderr[-3000:]
    return out / "lora-merged", out / "qlora-merged"


def test_base_adapters_and_merged_models_in_one_run(tmp_path, lora_adapter, qlora_adapter, merged):
    out = tmp_path / "eval"
    models = ["builtin:tiny-llama", str(lora_adapter), str(merged[0]), str(qlora_adapter), str(merged[1])]
    # through the launcher, from the repository root as docs/evaluation.md shows (the tasks' relative
    # data_files are read from INCLUDE_PATH); its environment sets the run, and an argument wins (--limit 4)
    result = run_cli(
        ["bash", str(REPO / "evaluate.sh"), "--limit", "4"],
        cwd=REPO,
        env={
            **OFFLINE,
            "MODELS": ",".join(models),
            "SUITE": "tiny_mc,tiny_gen",
            "INCLUDE_PATH": str(TASKS.relative_to(REPO)),
            "LIMIT": "2",
            "NUM_FEWSHOT": "0,1",
            "OUTPUT_DIR": str(out),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"adapter {qlora_adapter} on builtin:tiny-llama (4bit, as trained)" in result.stdout
    assert f"{merged[1]} (unquantized)" in result.stdout

    # the printed tables, also in results.md: one per task, a row per model in the order given, a column
    # per shot count; the two adapter folders are both named 'adapter', so their rows show the full path
    tables = (out / "results.md").read_text()
    assert tables in result.stdout
    blocks = tables.split("\n\n")
    assert blocks[0].splitlines()[:3] == ["### tiny_mc (acc)", "| Model | 0-shot | 1-shot |", "| --- | --- | --- |"]
    assert blocks[1].splitlines()[0] == "### tiny_gen (exact_match, strict-match)"
    assert "first 4 examples" in tables
    rows = blocks[0].splitlines()[3:]
    labels = ["builtin:tiny-llama", str(lora_adapter), "lora-merged", str(qlora_adapter), "qlora-merged"]
    assert [cells(row)[0] for row in rows] == labels

    config = json.loads((out / "eval_config.json").read_text())
    resolved = {m["spec"]: m for m in config["resolved"]["models"]}
    assert (resolved[str(qlora_adapter)]["quantization"], resolved[str(qlora_adapter)]["as_trained"]) == ("4bit", True)
    assert resolved[str(merged[1])]["quantization"] == "none"
    runs = {}
    for spec, row in zip(models, rows, strict=True):
        folder = out / resolved[spec]["folder"]
        runs[spec] = {n: json.loads((folder / f"{n}-shot.json").read_text()) for n in (0, 1)}
        for n, harness in runs[spec].items():
            assert harness["n-shot"] == {"tiny_mc": n, "tiny_gen": n}
            assert harness["n-samples"]["tiny_mc"]["effective"] == 4
            assert cells(row)[1 + n] == f"{harness['results']['tiny_mc']['acc,none']:.4f}", "the harness's number"
    assert runs[str(lora_adapter)][0]["config"]["model_args"]["peft"] == str(lora_adapter)

    # a continuous metric shows which weights were evaluated: the adapters are applied, and an adapter
    # evaluated unmerged (the harness's peft argument; the 4-bit base as trained) scores as its merge
    brier = {spec: r[1]["results"]["tiny_mc"]["brier_score,none"] for spec, r in runs.items()}
    base = brier["builtin:tiny-llama"]
    assert abs(brier[str(lora_adapter)] - base) > 1e-3 and abs(brier[str(qlora_adapter)] - base) > 1e-3
    assert brier[str(lora_adapter)] == pytest.approx(brier[str(merged[0])], abs=1e-5)
    assert brier[str(qlora_adapter)] == pytest.approx(brier[str(merged[1])], abs=1e-4)
    assert len(json.loads((out / "scores.json").read_text())) == 5


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_suite_task_and_missing_model_stop_before_any_work(tmp_path):
    out = tmp_path / "eval"
    result = evaluate_cli(
        "--models",
        f"builtin:tiny-llama,{tmp_path / 'nope'}",
        "--suite",
        "openlm,tiny_gem",
        "--include_path",
        ".",
        "--num_fewshot",
        "five",
        "--output_dir",
        out,
    )
    assert_user_error(
        result,
        "evaluate.py",
        f"--models {tmp_path / 'nope'}: folder does not exist",
        "unknown suite or task openlm; did you mean openllm?",
        "unknown suite or task tiny_gem; did you mean tiny_gen?",
        "--include_path .",
        "--num_fewshot five",
    )
    assert not out.exists()


def test_model_names_never_lead_results_outside_output_dir(tmp_path):
    """--models .., ., or a name with separators: each model's results folder is a new folder inside output_dir."""
    from platy.evaluate_stages import unique_folders
    from platy.evaluation import model_labels

    out = (tmp_path / "eval").resolve()
    specs = ["..", ".", "../..", "~", "a/../../b", "..\\x", "./"]
    folders = unique_folders(model_labels(specs))
    for spec, folder in zip(specs, folders):
        assert (out / folder).resolve().parent == out, (spec, folder)
    assert len(set(folders)) == len(specs)


def test_without_lm_eval_says_how_to_install_it(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # hides the installed lm-eval from this interpreter, as on a machine without it
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class HideLmEval:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'lm_eval':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, HideLmEval())\n"
    )
    result = evaluate_cli(
        "--models", "builtin:tiny-llama", "--output_dir", tmp_path / "eval", env={"PYTHONPATH": str(shim)}
    )
    assert_user_error(result, "evaluate.py", "lm-eval is not installed", "pip install -r requirements-eval.txt")
    assert not (tmp_path / "eval").exists()


def test_an_unreachable_hub_is_tried_once_then_the_run_is_offline(tmp_path):
    """No offline flags set and the hub out of reach: one connection attempt, a note, and the missing data set
    fails at once (offline mode), not after every request's retries."""
    # a local task whose data set is on the hub (indexing the harness's own tasks would take longer)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = (TASKS / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: hub_mc")
    (tasks / "hub_mc.yaml").write_text(task.replace("dataset_path: json", "dataset_path: someone/missing-set"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_DATASETS_CACHE=str(tmp_path / "empty-cache"))
    args = ["--models", "builtin:tiny-llama", "--suite", "hub_mc", "--include_path", tasks]
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *map(str, args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Note: 127.0.0.1 cannot be reached" in result.stdout, result.stdout[-2000:]
    assert_user_error(result, "evaluate.py", "cannot load task hub_mc", "OfflineModeIsEnabled")
    assert "Retrying" not in result.stderr
