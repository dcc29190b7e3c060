"""Flags declared once (platy/flags.py): the command line, --help, the run record and the resume check all
follow the declaration, so a new flag is one declaration plus its use."""

import sys

import pytest

from platy.cli import UserError
from platy.flags import Flag, Flags
from platy.train.flags import TRAIN_FLAGS

from conftest import REPO, run_cli

DEMO = Flags(
    Flag("name", "", str, "A text."),
    Flag("steps", 3, int, "A count."),
    Flag("rate", 0.5, float, "A number."),
    Flag("packing", False, bool, "A switch."),
    Flag("targets", ("a", "b"), None, "A list."),
)


def parse(*argv):
    return DEMO.parse(list(argv), "demo.py")


def test_values_are_read_as_typed():
    assert parse() == {"name": "", "steps": 3, "rate": 0.5, "packing": False, "targets": ("a", "b")}
    values = parse("--name", "2024", "--steps=7", "--rate", "1e-4", "--targets", "[q_proj, v_proj]")
    assert values["name"] == "2024" and values["steps"] == 7 and values["rate"] == 1e-4
    assert values["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "argv, packing",
    [
        (["--packing"], True),
        (["--packing", "no"], False),
        (["--packing=Yes"], True),
        (["--nopacking"], False),
        (["--packing", "1"], True),
        (["--packing", "None"], None),  # inference.py's --load_4bit None: as the adapter was trained
        (["--packing", "none"], False),
    ],
)
def test_bool_words(argv, packing):
    assert parse(*argv)["packing"] is packing


def test_a_bad_bool_word_and_an_unknown_flag_are_refused():
    with pytest.raises(UserError, match=r"--packing 'maybe': give True or False"):
        parse("--packing", "maybe")
    with pytest.raises(UserError, match="unknown flag --step; did you mean --steps"):
        parse("--step", "4")
    with pytest.raises(UserError, match="unknown flag --zzz; see demo.py --help"):
        parse("--zzz")
    with pytest.raises(UserError, match="unknown flag --zzz"):  # before any value is read
        parse("--packing", "maybe", "--zzz", "1")
    with pytest.raises(UserError, match=r"^--packing 2: give True or False$"):
        parse("--packing", "2")
    with pytest.raises(UserError, match="-r could be any of --rate, --r2"):
        Flags(*DEMO, Flag("r2", 1, int, "")).parse(["-r", "3"], "demo.py")


def test_the_last_of_a_repeated_flag_wins_and_values_without_a_name_fill_in_order():
    """A recipe's extra arguments come last and override its settings."""
    assert parse("--steps", "4", "--steps", "9")["steps"] == 9
    assert parse("x", "5")["name"] == "x" and parse("x", "5")["steps"] == 5
    assert parse("--name", "x", "5") == {**DEMO.defaults(), "name": "x", "steps": 5}  # the flags not named
    assert parse("--rate", "-1")["rate"] == -1  # a negative number is a value, not a flag
    assert parse("--name", "--steps")["name"] == "--steps"  # a text flag takes the next word as typed
    assert parse("-s", "4", "-p")["steps"] == 4 and parse("-p")["packing"] is True  # the one flag of that letter


def test_help_groups_and_wraps_every_flag():
    text = TRAIN_FLAGS.help()
    lines = text.splitlines()
    assert "  LoRA:" in lines and "  model and data:" in lines
    assert [line.split()[0] for line in lines if line.startswith("  --")] == [
        f"--{name}" for name in TRAIN_FLAGS.names()
    ]
    assert max(len(line) for line in lines if line.startswith("      ")) <= 6 + 92


def test_a_new_flag_is_one_declaration(monkeypatch, tmp_path, capsys):
    """A flag added to the declarations alone shows in --help, reaches the run (and its record) and is
    checked on resume."""
    from platy.train import config, recipe

    new = Flag("demo_knob", 3, int, "A knob declared for this test only.", group="LoRA", resume=True)
    monkeypatch.setattr(TRAIN_FLAGS, "flags", (*TRAIN_FLAGS.flags, new))
    monkeypatch.setitem(TRAIN_FLAGS.by_name, new.name, new)

    help_text = run_cli([sys.executable, str(REPO / "finetune.py"), "--help"]).stdout
    assert "--demo_knob (default: 3)" in help_text and "A knob declared for this test only." in help_text

    flags = TRAIN_FLAGS.parse(
        [
            "--base_model=builtin:tiny-llama",
            f"--data_path={REPO / 'data' / 'sample_platypus.json'}",
            f"--output_dir={tmp_path / 'out'}",
            "--demo_knob=7",
            "--dry_run",
        ],
        "finetune.py",
    )
    run = recipe.Recipe.from_flags(flags).run
    assert run.demo_knob == 7
    record = recipe.describe_run(run)
    assert record.flag("demo_knob") == 7

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    record.write(checkpoint)
    capsys.readouterr()
    config.note_changed_settings(str(checkpoint), {**run.flags(), "demo_knob": 8}, run.data_fingerprint)
    assert "demo_knob 7 -> 8" in capsys.readouterr().out
