"""Small flag validators shared by every script's flag check.

Each takes the flag's name (without dashes) and its value and returns a problem sentence, or
None when the value is good; a script collects the problems of all its flags and fails once
(cli.fail_on). Imports nothing of the project.
"""


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name, value, optional=False):
    if optional and value is None:
        return None
    if not is_int(value) or value < 1:
        return f"--{name} must be a positive integer, got {value!r}"
    return None


def non_negative_int(name, value):
    if not is_int(value) or value < 0:
        return f"--{name} must be a non-negative integer, got {value!r}"
    return None


def integer(name, value):
    return None if is_int(value) else f"--{name} must be an integer, got {value!r}"


def number(name, value):
    return None if is_number(value) else f"--{name} must be a number, got {value!r}"


def positive_number(name, value, optional=False):
    if optional and value is None:
        return None
    if not is_number(value) or value <= 0:
        return f"--{name} must be a positive number, got {value!r}"
    return None


def non_negative_number(name, value):
    if not is_number(value) or value < 0:
        return f"--{name} must be a non-negative number, got {value!r}"
    return None


def number_in(name, value, low, high, low_open=False, high_open=False):
    """value in the interval [low, high], each end open where asked."""
    if is_number(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return None
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return f"--{name} must be a number in {interval}, got {value!r}"


def choice(name, value, options):
    return None if value in options else f"--{name} {value}: choose one of {', '.join(map(str, options))}"


def problems_of(*results):
    """The problem sentences among validator results (None means no problem)."""
    return [r for r in results if r]
