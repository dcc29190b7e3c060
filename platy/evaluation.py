"""Benchmark suites and their tables: which harness number goes in which cell, and how it is shown.

The scores themselves come from lm-evaluation-harness; this module only picks them out of
its results and lays them out the way the published model cards do (Open LLM Leaderboard
table for Platypus, PlatYi and Dolphin-ORCA-Platypus; KoBEST tables for KO-Platypus and
KoT-Platypus).
"""

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Score:
    """One cell of a table: a harness task at a shot count, and the metric read from its results."""

    title: str  # the column (one-table suites) or the table (one table per task)
    task: str  # harness task or group name
    shots: int | None  # None: the task's own default
    metric: str | None  # harness metric name; None: the first one the task reports
    filter: str = "none"  # harness filter of generation tasks, e.g. GSM8K's strict-match
    # the Open LLM Leaderboard's MMLU is the plain mean of its 57 subjects; the harness's own
    # group score weights subjects by their number of questions
    subject_mean: bool = False


@dataclass(frozen=True)
class Suite:
    name: str
    scores: tuple
    per_task: bool  # False: one table, a column per score; True: a table per task, a column per shot count
    percent: bool  # shown as percentages with 2 decimals (leaderboard) or fractions with 4 (KoBEST)
    average: bool  # an Average column: the mean of the row's scores
    include: Path | None = None  # the folder of the suite's own tasks (bundled ones), read offline

    def tasks(self):
        return list(dict.fromkeys(s.task for s in self.scores))

    def shot_counts(self):
        return list(dict.fromkeys(s.shots for s in self.scores))

    def heading(self, title):
        """A per-task table's heading, as the KoBEST cards write it: '### COPA (F1)'."""
        metric = next(s.metric for s in self.scores if s.title == title)
        return f"### {title} ({METRIC_NAMES.get(metric, metric)})"


METRIC_NAMES = {"f1": "F1", "acc": "accuracy", "acc_norm": "normalized accuracy", "exact_match": "exact match"}

# Open LLM Leaderboard (v1): shots and metrics as the leaderboard ran them.
OPENLLM = Suite(
    name="openllm",
    scores=(
        Score("ARC", "arc_challenge", 25, "acc_norm"),
        Score("HellaSwag", "hellaswag", 10, "acc_norm"),
        Score("MMLU", "mmlu", 5, "acc", subject_mean=True),
        Score("TruthfulQA", "truthfulqa_mc2", 0, "acc"),  # truthfulqa_mc2's acc is the mc2 score
        Score("Winogrande", "winogrande", 5, "acc"),
        Score("GSM8K", "gsm8k", 5, "exact_match", "strict-match"),  # the answer after '####', as the leaderboard
    ),
    per_task=False,
    percent=True,
    average=True,
)

KOBEST_TASKS = (
    ("COPA", "kobest_copa"),
    ("HellaSwag", "kobest_hellaswag"),
    ("BoolQ", "kobest_boolq"),
    ("SentiNeg", "kobest_sentineg"),
)
KOBEST_SHOTS = (0, 5, 10, 50)

# KoBEST as the KO-Platypus cards report it: macro F1 at 0, 5, 10 and 50 shots.
KOBEST = Suite(
    name="kobest",
    scores=tuple(Score(title, task, shots, "f1") for title, task in KOBEST_TASKS for shots in KOBEST_SHOTS),
    per_task=True,
    percent=False,
    average=False,
)

# The quick start's task (data/toolcalls): held-out requests answered with one tool call as JSON,
# exact match with spaces ignored.
TOOLCALLS = Suite(
    name="toolcalls",
    scores=(Score("Tool calls", "platy_toolcalls", 0, "exact_match"),),
    per_task=False,
    percent=True,
    average=False,
    include=Path(__file__).resolve().parent.parent / "data" / "toolcalls",
)

# The preference example's check (data/arithmetic): held-out questions answered in the chosen answers'
# style, "The answer is N." with the right N.
ARITHMETIC = Suite(
    name="arithmetic",
    scores=(Score("Final answer", "platy_arithmetic", 0, "exact_match", "chosen-style"),),
    per_task=False,
    percent=True,
    average=False,
    include=Path(__file__).resolve().parent.parent / "data" / "arithmetic",
)

SUITES = {suite.name: suite for suite in (OPENLLM, KOBEST, TOOLCALLS, ARITHMETIC)}


def custom_suite(tasks, shot_counts):
    """A suite from a task list: one table (one shot count) or a table per task (several)."""
    shot_counts = list(shot_counts) or [None]
    return Suite(
        name="custom",
        scores=tuple(Score(task, task, shots, None) for task in tasks for shots in shot_counts),
        per_task=len(shot_counts) > 1,
        percent=False,
        average=False,
    )


def with_shots(suite, shot_counts):
    """The suite at other shot counts (--num_fewshot): one count for a one-table suite."""
    if not suite.per_task:
        (shots,) = shot_counts
        return replace(suite, scores=tuple(replace(s, shots=shots) for s in suite.scores))
    cells = dict.fromkeys(replace(s, shots=None) for s in suite.scores)
    return replace(suite, scores=tuple(replace(cell, shots=shots) for cell in cells for shots in shot_counts))


def reported_metrics(task_results):
    """'metric,filter' keys of one task's results, in the harness's order, without standard errors."""
    return [
        key
        for key, value in task_results.items()
        if "," in key and "_stderr," not in key and isinstance(value, (int, float))
    ]


def leaf_tasks(group_subtasks, name):
    """The tasks under a group, through nested groups; a task without subtasks is its own leaf."""
    children = group_subtasks.get(name) or []
    if not children:
        return [name]
    return [leaf for child in children for leaf in leaf_tasks(group_subtasks, child)]


def metric_key(score, run):
    """The 'metric,filter' key read for this score from a harness run (first reported metric if unset)."""
    if score.metric is not None:
        return f"{score.metric},{score.filter}"
    reported = reported_metrics(run["results"].get(score.task, {}))
    return reported[0] if reported else None


def score_value(score, run):
    """The number for one cell from the harness run at its shot count, or None if the run lacks it."""
    if run is None:
        return None
    key = metric_key(score, run)
    names = leaf_tasks(run.get("group_subtasks") or {}, score.task) if score.subject_mean else [score.task]
    values = [run["results"].get(name, {}).get(key) for name in names]
    if not values or any(not isinstance(v, (int, float)) for v in values):
        return None
    return sum(values) / len(values)


def format_value(value, percent):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def row_scores(suite, runs):
    """{score: value} for one model; runs maps shot count -> harness results."""
    return {score: score_value(score, runs.get(score.shots)) for score in suite.scores}


def average(values):
    """Mean of a row's scores; None when one is missing (an average of fewer would mislead)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def markdown_row(cells):
    return "| " + " | ".join(cells) + " |"


def column_title(score, runs_by_model):
    """A custom task's column names the metric read, e.g. 'tiny_mc (acc)'."""
    if score.metric is not None:
        return score.title
    for runs in runs_by_model.values():
        run = runs.get(score.shots)
        key = run and metric_key(score, run)
        if key:
            metric, _, filt = key.partition(",")
            return f"{score.title} ({metric}{'' if filt == 'none' else ', ' + filt})"
    return score.title


def shots_title(shots):
    return "default shots" if shots is None else f"{shots}-shot"


def render_tables(suite, runs_by_model):
    """Markdown in the published layout; runs_by_model: {model label: {shot count: harness results}}."""
    rows = {label: row_scores(suite, runs) for label, runs in runs_by_model.items()}
    if not suite.per_task:
        titles = [column_title(s, runs_by_model) for s in suite.scores]
        header = ["Model"] + (["Average"] if suite.average else []) + titles
        lines = [markdown_row(header), markdown_row(["---"] * len(header))]
        for label, values in rows.items():
            cells = [format_value(values[s], suite.percent) for s in suite.scores]
            if suite.average:
                cells.insert(0, format_value(average(values.values()), suite.percent))
            lines.append(markdown_row([label, *cells]))
        return "\n".join(lines) + "\n"
    blocks = []
    for title in dict.fromkeys(s.title for s in suite.scores):
        scores = [s for s in suite.scores if s.title == title]
        heading = suite.heading(title) if scores[0].metric else f"### {column_title(scores[0], runs_by_model)}"
        header = ["Model"] + [shots_title(s.shots) for s in scores]
        lines = [heading, markdown_row(header), markdown_row(["---"] * len(header))]
        for label, values in rows.items():
            lines.append(markdown_row([label] + [format_value(values[s], suite.percent) for s in scores]))
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def scores_json(suite, runs_by_model):
    """The tables' numbers as data: per model, per cell, with the task, shots and metric they come from."""
    out = {}
    for label, runs in runs_by_model.items():
        values = row_scores(suite, runs)
        cells = [
            {
                "title": score.title,
                "task": score.task,
                "shots": score.shots,
                "metric": runs.get(score.shots) and metric_key(score, runs.get(score.shots)),
                "subject_mean": score.subject_mean,
                "value": values[score],
            }
            for score in suite.scores
        ]
        entry = {"scores": cells}
        if suite.average:
            entry["average"] = average(c["value"] for c in cells)
        out[label] = entry
    return out


def model_labels(specs):
    """Row names: the last part of each path or hub id (as the model cards name models); the full
    text where two would read the same."""
    short = [Path(spec.rstrip("/")).name or spec for spec in specs]
    return [spec if short.count(name) > 1 else name for spec, name in zip(specs, short)]


def folder_name(label):
    """A file-system-safe folder name for a model's results: a new folder inside output_dir, never `.`, `..` or a
    hidden one (--models .. must not write beside output_dir)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"


def answer_rows(samples, count):
    """The first `count` prompts of one task, each as (request, expected, {model label: (answer, scored)}).

    samples: {model label: the harness's logged samples of the task}; the request is the row's
    instruction when it has one, else the prompt's last line. The answer is the model's own text, before
    any filter of the task picked its scored part out of it.
    """
    rows = []
    first = next(iter(samples.values()), [])
    for index, sample in enumerate(first[:count]):
        doc = sample.get("doc") or {}
        request = doc.get("instruction") or str(sample["arguments"][0][0]).strip().splitlines()[-1]
        answers = {}
        for label, logged in samples.items():
            row = logged[index]
            answer = raw_answer(row)
            metric = next((k for k in ("exact_match", "acc") if k in row), None)
            answers[label] = (str(answer).strip(), bool(row[metric]) if metric else None)
        rows.append((request, str(sample.get("target", "")).strip(), answers))
    return rows


def raw_answer(row):
    generated = row.get("resps") or [[]]
    if generated[0]:
        return generated[0][0]
    return row["filtered_resps"][0] if row.get("filtered_resps") else ""


def render_answers(task, rows):
    """The answers block: each request, the expected answer, and every model's answer with a mark."""
    marks = {True: "right", False: "wrong", None: ""}
    width = max([len("expected")] + [len(label) for _, _, answers in rows for label in answers])
    lines = [f"Answers to the first {len(rows)} prompt{'' if len(rows) == 1 else 's'} of {task}:"]
    for request, expected, answers in rows:
        lines += [f"  {request}", f"    {'expected'.ljust(width)}  {expected}"]
        for label, (answer, scored) in answers.items():
            lines.append(f"    {label.ljust(width)}  {answer or '(nothing)'}  [{marks[scored]}]".rstrip())
    return "\n".join(lines) + "\n"
