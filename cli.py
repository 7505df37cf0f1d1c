"""The command-line conventions the scripts (train.py, validate.py, cache_teacher.py, the benchmarks) share.

A mistake on the command line (or in a YAML config) is one sentence on stderr and exit status 2: `UsageError`,
printed by `report_user_error`.
Flags are never abbreviated, so a misspelt flag is never taken for another. A flag's value is checked where it is
parsed: a single value by its argparse `type=` (`number(...)` for ranges), values that only make sense together
(how many, in what order) by `check_values` right after parsing.
"""
import argparse
import sys
from contextlib import suppress
from typing import Callable, Iterable, NoReturn, Tuple

import torch.distributed as dist

from data.errors import user_message


class UsageError(Exception):
    """Bad input from the user: printed as one sentence on stderr, exit status 2, nothing written."""


def report_user_error(script: str, error: Exception) -> int:
    """Print a user's mistake as `<script>: error: <one sentence>` on stderr; returns its exit status, 2."""
    print(f'{script}: error: {user_message(error)}', file=sys.stderr)
    return 2


def exit_process(code: int) -> NoReturn:
    """Exit with `code`, first leaving the process group of a distributed run (torchrun) if one was started."""
    if dist.is_available() and dist.is_initialized():
        with suppress(Exception):
            dist.destroy_process_group()
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """Errors become UsageError; no prefix abbreviations, so a misspelt flag is never taken for another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def _bound(value) -> str:
    return f'{value:g}' if isinstance(value, float) else str(value)


def number(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False) -> Callable:
    """An argparse `type=` for an int or float within [low, high] (`low_open`/`high_open`: the bound itself is
    excluded). A value outside names itself and the range; a value that is no number gets argparse's own
    "invalid int value" message. `base_type` tells YAML configs which Python type the flag holds."""
    parts = []
    if low is not None:
        parts.append(f'{">" if low_open else ">="} {_bound(low)}')
    if high is not None:
        parts.append(f'{"<" if high_open else "<="} {_bound(high)}')
    accepted = f'{"an integer" if kind is int else "a number"} {" and ".join(parts)}'

    def convert(text):
        if isinstance(text, bool):
            raise ValueError(text)
        if kind is int and isinstance(text, float):
            if not text.is_integer():
                raise ValueError(text)
            text = int(text)
        value = kind(text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f'{text} is out of range; give {accepted}')
        return value

    convert.__name__ = kind.__name__  # argparse's "invalid float value: 'fast'" names the type by it
    convert.base_type = kind
    return convert


# (flag dest, test of its parsed value, what is accepted): checks of values that only make sense together
ValueRule = Tuple[str, Callable, str]


def check_values(args: argparse.Namespace, rules: Iterable[ValueRule]):
    """Raise a UsageError naming the first flag whose value (not None) fails its rule."""
    for dest, accepts, accepted in rules:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if not accepts(value):
            shown = ' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, (list, tuple)) else str(value)
            raise UsageError(f'--{dest.replace("_", "-")} {shown} is not accepted; {accepted}')


def ascending_pair(low_exclusive=0.0, high=None) -> Callable:
    """Two values low <= high, low above `low_exclusive` and high at most `high` (when given)."""
    def accepts(values):
        return len(values) == 2 and low_exclusive < values[0] <= values[1] and (high is None or values[1] <= high)
    return accepts


class Switch(argparse.BooleanOptionalAction):
    """An on/off flag with both forms, so the command line can undo what a YAML switched on: `--amp` / `--no-amp`,
    and for a flag named in the negative, `--no-aug` / `--aug`. The help text stays as written."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        self.off_strings = ['--' + s[5:] if s.startswith('--no-') else '--no-' + s[2:]
                            for s in option_strings if s.startswith('--')]
        argparse.Action.__init__(self, option_strings=list(option_strings) + self.off_strings, dest=dest, nargs=0,
                                 default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.off_strings)


# the image flags train.py and validate.py share: every dataset here gives RGB images
IMAGE_RULES = [
    ('mean', lambda v: len(v) in (1, 3), 'give one value, or three (one per RGB channel)'),
    ('std', lambda v: len(v) in (1, 3) and min(v) > 0, 'give one positive value, or three (one per RGB channel)'),
    ('input_size', lambda v: v[0] == 3 and min(v[1:]) >= 1, 'give 3 H W (every dataset here gives RGB images)'),
]
