"""Platypus's defaults live in finetune.py's flag declarations (platy/train/flags.py); fine-tuning.sh,
recipes/common.sh and docs/training.md repeat them, and these tests fail as soon as one of those copies
differs.

Nothing is trained or loaded: the defaults are read from the declarations, the shell scripts and the
Markdown table are parsed as text.
"""

import re
import shlex
from pathlib import Path

from platy.cli import FALSE_WORDS, TRUE_WORDS
from platy.train.flags import TRAIN_FLAGS

REPO = Path(__file__).resolve().parent.parent
# fine-tuning.sh passes these from its environment (BASE_MODEL, DATA_PATH, OUTPUT_DIR): they name the
# run, they are no hyperparameters, and their defaults differ from train()'s on purpose
LAUNCH_FLAGS = {"base_model", "data_path", "output_dir"}


def train_defaults():
    """{flag: default} of finetune.py, as declared."""
    return TRAIN_FLAGS.defaults()


def shell_value(text, default):
    """The value finetune.py receives for TEXT on its command line, in the type of the flag's default."""
    if isinstance(default, bool):
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (list, tuple)):  # '[gate_proj, down_proj, up_proj]' or 'gate_proj,down_proj,up_proj'
        return tuple(name.strip().strip("'\"") for name in text.strip().strip("[]()").split(",") if name.strip())
    return text


def mismatches(values, defaults, where):
    """One sentence per flag of VALUES ({flag: text}) that is not train()'s default."""
    problems = []
    for flag, text in values.items():
        if flag not in defaults:
            problems.append(f"{where}: --{flag} is not a flag of finetune.py's train()")
            continue
        default = defaults[flag]
        if default is None:
            problems.append(f"{where}: --{flag} {text!r}, but train() has no default for it")
            continue
        try:
            value = shell_value(text, default)
        except ValueError as err:
            problems.append(f"{where}: --{flag} {text!r}: {err}")
            continue
        if value != (tuple(default) if isinstance(default, list) else default):
            problems.append(f"{where}: --{flag} {text!r}, but train()'s default is {default!r}")
    return problems


def fine_tuning_sh_flags():
    """({flag: text} of the literal values in fine-tuning.sh's args=( ... ), {flags passed from variables})."""
    text = (REPO / "fine-tuning.sh").read_text()
    block = re.search(r"^args=\((.*?)^\)", text, re.S | re.M)
    assert block, "fine-tuning.sh: no args=( ... ) block"
    words = shlex.split(block.group(1), comments=True)
    literal, from_variables = {}, set()
    for flag, value in zip(words[::2], words[1::2]):
        assert flag.startswith("--"), f"fine-tuning.sh: {flag!r} where a --flag was expected"
        if "$" in value:
            from_variables.add(flag[2:])
        else:
            literal[flag[2:]] = value
    return literal, from_variables


def platypus_defaults_in_common_sh():
    """{flag: text} of each `setting FLAG VALUE` in recipes/common.sh's platypus_defaults()."""
    text = (REPO / "recipes" / "common.sh").read_text()
    body = re.search(r"^platypus_defaults\(\) \{(.*?)^\}", text, re.S | re.M)
    assert body, "recipes/common.sh: no platypus_defaults() { ... } function"
    settings = {}
    for line in body.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "setting":
            assert len(words) == 3, f"recipes/common.sh: {line.strip()!r} is not `setting FLAG VALUE`"
            assert words[1] not in settings, f"recipes/common.sh: {words[1]} is set twice"
            settings[words[1]] = words[2]
    return settings


def training_md_tables():
    """{heading: {flag: default cell}} of every `| flag | default | ...` table in docs/training.md."""
    tables, heading, in_table = {}, None, False
    for line in (REPO / "docs" / "training.md").read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["flag", "default"]:
            in_table = True
            tables[heading] = {}
        elif not cells:
            in_table = False
        elif in_table and not set(cells[0]) <= set("-: "):
            tables[heading][cells[0].strip("`")] = cells[1]
    return tables


def documented_values(rows, defaults):
    """{flag: text} of the table cells written as code; a plain word ('unset') must stand for no default."""
    values, problems = {}, []
    for flag, cell in rows.items():
        if cell.startswith("`") and cell.endswith("`"):
            values[flag] = cell.strip("`")
        elif defaults.get(flag) not in (None, ""):
            problems.append(f"docs/training.md: --{flag} {cell!r}, but train()'s default is {defaults.get(flag)!r}")
    return values, problems


def test_fine_tuning_sh_passes_train_defaults():
    defaults = train_defaults()
    literal, from_variables = fine_tuning_sh_flags()
    assert from_variables <= LAUNCH_FLAGS, (
        f"fine-tuning.sh passes {sorted(from_variables - LAUNCH_FLAGS)} from variables"
    )
    assert {"batch_size", "learning_rate", "lora_target_modules", "cutoff_len"} <= set(literal)
    assert mismatches(literal, defaults, "fine-tuning.sh") == []


def test_recipes_platypus_defaults_are_train_defaults():
    defaults = train_defaults()
    settings = platypus_defaults_in_common_sh()
    assert {"batch_size", "learning_rate", "lora_target_modules", "cutoff_len"} <= set(settings)
    assert mismatches(settings, defaults, "recipes/common.sh platypus_defaults") == []


def test_training_md_tables_are_train_defaults():
    defaults = train_defaults()
    tables = training_md_tables()
    platypus = tables.get("Platypus's flags and defaults")
    assert platypus, f"docs/training.md: no Platypus defaults table (tables under {sorted(tables)})"
    # the table lists exactly the hyperparameters fine-tuning.sh spells out, and every recipe default
    literal, _ = fine_tuning_sh_flags()
    assert set(platypus) == set(literal)
    assert set(platypus_defaults_in_common_sh()) <= set(platypus)
    problems = []
    for rows in tables.values():
        values, unset = documented_values(rows, defaults)
        problems += unset + mismatches(values, defaults, "docs/training.md")
    assert problems == []


def test_every_flag_of_train_is_on_training_md():
    text = (REPO / "docs" / "training.md").read_text()
    assert [flag for flag in train_defaults() if f"`{flag}`" not in text] == []


def test_a_changed_value_or_order_is_reported():
    defaults = train_defaults()
    settings = platypus_defaults_in_common_sh()
    assert mismatches({**settings, "lora_target_modules": "[gate_proj, up_proj, down_proj]"}, defaults, "x")
    assert mismatches({**settings, "learning_rate": "3e-4"}, defaults, "x")
    assert mismatches({**settings, "train_on_inputs": "True"}, defaults, "x")
    assert mismatches({**settings, "no_such_flag": "1"}, defaults, "x")
