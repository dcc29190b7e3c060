"""A script's flags, each declared once: name, type, default, help, group and how a resume treats it.

The command-line parser, `--help`, the defaults that tests and benchmarks start from, the run record's
flags and the resume check are all read from the declarations, never from a second list.

Values are read as the Platypus scripts' fire command lines read them: a str flag takes the text as
typed, a bool flag takes true/false words (or None), any other flag a Python literal (numbers, lists,
None) or, when the text is none, the text itself. `--name value` and `--name=value`; a flag alone is
true, and `--noname` false; `-x` is the one flag starting with x; values without a name fill the flags
not named, in order; the last of a repeated flag wins (a recipe's extra arguments override its settings).
"""

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any

from platy.cli import FALSE_WORDS, TRUE_WORDS, UserError

HELP_WIDTH = 92  # the flag descriptions of --help are wrapped to this many characters


@dataclass(frozen=True)
class Flag:
    """One flag of a script.

    kind: str (the text as typed), bool (true/false words), or None (a Python literal: int, float, list,
    None, or a word). resume: a run resumed from a checkpoint must have the same value, or it does not
    continue as the interrupted run would have (a note says which differ). lora_only: a LoRA setting that
    --finetuning full refuses when it is not its default."""

    name: str
    default: Any
    kind: type
    help: str
    group: str = ""
    resume: bool = False
    lora_only: bool = False

    def read(self, text):
        """The value of this flag given as TEXT after its name (python-fire's reading, which the Platypus
        scripts had): a text flag keeps the text, any other a Python literal (or the word); value_of then
        reads a bool flag's word."""
        return text if self.kind is str else literal(text)

    def value_of(self, value):
        """The flag's value from what the command line gave: a bool flag's true/false word as True or False
        (None stays None: some flags use it for "as trained"), a UserError for any other word."""
        if self.kind is not bool or value is None or isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise UserError(f"--{self.name} {value!r}: give True or False")


def grouped(group, *flags):
    """The flags, under one heading of --help."""
    return [dataclasses.replace(flag, group=group) for flag in flags]


def literal(text):
    """fire's reading of a value: a Python literal where TEXT is one, else the text itself."""
    from fire.parser import DefaultParseValue

    return DefaultParseValue(text)


class Flags:
    """The ordered flags of one script."""

    def __init__(self, *flags):
        self.flags = flags
        self.by_name = {flag.name: flag for flag in flags}
        assert len(self.by_name) == len(flags), "a flag is declared twice"

    def __iter__(self):
        return iter(self.flags)

    def names(self):
        return list(self.by_name)

    def defaults(self):
        """{flag: default}: what a run given no flags gets."""
        return {flag.name: flag.default for flag in self.flags}

    def where(self, **wanted):
        """The names of the flags whose declaration has these values (e.g. resume=True), in declared order."""
        return tuple(f.name for f in self.flags if all(getattr(f, key) == value for key, value in wanted.items()))

    def parse(self, argv, program):
        """{flag: value} of a command line: every declared flag, the given ones read from their text.
        An unknown flag is refused with the closest name; every bool flag given another word is reported
        at once."""
        given, positional = self.given(list(argv), program)
        named = {flag.name for flag, _ in given}
        unnamed = [flag for flag in self.flags if flag.name not in named]
        if len(positional) > len(unnamed):
            raise UserError(f"unexpected argument {positional[len(unnamed)]!r}; see {program} --help")
        given += [(flag, literal(text)) for flag, text in zip(unnamed, positional)]
        values, problems = self.defaults(), []
        for flag, value in given:  # the last of a repeated flag wins
            try:
                values[flag.name] = flag.value_of(value)
            except UserError as err:
                problems.append(str(err))
        if problems:
            raise UserError("; ".join(dict.fromkeys(problems)))
        return values

    def given(self, args, program):
        """([(flag, value)] in command-line order, [values given without a name])."""
        given, positional, i = [], [], 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                raise UserError(f"unexpected '--': give each flag as --name value; see {program} --help")
            if not is_flag(arg):
                positional.append(arg)
                i += 1
                continue
            name, eq, text = arg.lstrip("-").partition("=")
            name = name.replace("-", "_")
            has_next = i + 1 < len(args)
            alone = not eq and (not has_next or is_flag(args[i + 1]))
            flag = self.lookup(name, alone, arg, program)
            if eq:
                value = flag.read(text)
            elif has_next and (flag.kind is str or not alone):  # a text flag takes the next word, whatever it is
                value = flag.read(args[i + 1])
                i += 1
            else:
                value = flag.name == name or len(name) == 1  # --name alone is True, --noname False
            given.append((flag, value))
            i += 1
        return given, positional

    def lookup(self, name, alone, arg, program):
        """The flag a command-line word names: its name, no + its name for a bool false, or (-x) the one flag
        whose name starts with that letter."""
        if name in self.by_name:
            return self.by_name[name]
        if alone and name.startswith("no") and name[2:] in self.by_name:
            return self.by_name[name[2:]]
        if len(name) == 1 and not arg.startswith("--"):
            starting = [flag for flag in self.flags if flag.name.startswith(name)]
            if len(starting) == 1:
                return starting[0]
            if starting:
                names = ", ".join(f"--{flag.name}" for flag in starting)
                raise UserError(f"-{name} could be any of {names}; give the whole name")
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean --{close[0]}?" if close else f"; see {program} --help"
        raise UserError(f"unknown flag --{name}{hint}")

    def help(self):
        """Every flag with its default and description, in declared order under its group's heading."""
        lines, group = [], None
        for flag in self.flags:
            if flag.group and flag.group != group:
                group = flag.group
                lines.append(f"  {group}:")
            lines.append(f"  --{flag.name} (default: {flag.default!r})")
            text = " ".join(flag.help.split())
            while text:
                cut = text.rfind(" ", 0, HELP_WIDTH) if len(text) > HELP_WIDTH else len(text)
                cut = cut if cut > 0 else len(text)
                lines.append(f"      {text[:cut].strip()}")
                text = text[cut:].strip()
        return "\n".join(lines)


def is_flag(arg):
    """--name or -n (fire's rule: -1 is a value, not a flag)."""
    return arg.startswith("--") or re.match(r"-[a-zA-Z]", arg) is not None


def declared(flags):
    """Mark fn as the entry of a script whose flags are `flags`: platy.cli.run parses its command line and
    prints its --help from them, and fn is called with every flag by name."""

    def mark(fn):
        fn.flags = flags
        return fn

    return mark


def from_signature(fn):
    """fn, with its flags read from its signature (defaults; str and bool annotations) and the descriptions
    of its `Args:` docstring: for the benchmark scripts, whose flags are declared the plain way."""
    import inspect

    _, _, rest = (inspect.getdoc(fn) or "").partition("Args:")
    descriptions, current = {}, None
    for line in rest.splitlines():
        head, sep, tail = line.strip().partition(":")
        if sep and line.startswith(" " * 4) and not line.startswith(" " * 8) and head.isidentifier():
            current = head
            descriptions[current] = tail.strip()
        elif current and line.strip():
            descriptions[current] += " " + line.strip()
    fn.flags = Flags(
        *(
            Flag(name, p.default, p.annotation if p.annotation in (str, bool) else None, descriptions.get(name, ""))
            for name, p in inspect.signature(fn).parameters.items()
        )
    )
    return fn
