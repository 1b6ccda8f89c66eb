"""Exceptions whose messages are for the user, and how command-line front ends report them."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UsageError(ValueError):
    """A one-line, actionable message about the user's input; CLIs print it and exit with code 2.

    It subclasses ValueError so library callers can catch it as one.
    """


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says why and what to do."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An exception's message collapsed to one line (its type name if empty), cut at ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main: Callable[[], object]) -> int:
    """Run a CLI's main: a UsageError becomes one line on stderr and exit code 2, never a traceback."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse for resdiff's CLIs: a mistake is one UsageError line (exit code 2 through ``run_cli``) instead of
    usage text plus a message, and no option is matched by an abbreviation (launchers parse those even after the
    script name: docs/design.md, Conventions)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")
