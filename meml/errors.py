"""The one exception class for mistakes in what a user gives us: a file, a data line, a flag.

`train.py` and `evaluate.py` print such an error as one line, `train.py: <message>`, and exit
with status 2 as argparse does; every other exception is a bug in meml and keeps its traceback.
It is a ValueError, so code that catches ValueError still catches it. The two scripts' parser
(`ArgumentParser`) raises it for a bad flag, so argparse's own errors are that one line too.
"""
import argparse


class InputError(ValueError):
    """A user's mistake; the message names the file, line, field or flag, and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad flag raised as an InputError (so the scripts print it as
    their one line) instead of printed with the usage and exited from inside argparse."""

    def error(self, message):
        raise InputError(message)


def count_at_least(at_least: int):
    """An argparse type: an integer of at least `at_least` (a negative --train-size or --limit
    would otherwise act as a Python slice from the end)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < at_least:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {at_least}")
        return value
    parse.__name__ = "int"  # what argparse names in "invalid int value"
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (--plan's GB)."""
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number above 0")
    return value
