"""Argument types and checks shared by the command-line tools."""
from __future__ import annotations

import argparse
import importlib
import math
import warnings


def plain_warnings() -> None:
    """Warnings as one line each, "warning: <message>", for a tool's user: Python's default form
    adds the file, line number and source line of the library code that warned."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


def int_at_least(low: int):
    """An argparse type: a whole number >= low."""
    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    return parse


def int_in(low: int, high: int):
    """An argparse type: a whole number in low..high."""
    at_least = int_at_least(low)

    def parse(s: str) -> int:
        n = at_least(s)
        if n > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {n}")
        return n
    return parse


def seconds(zero_allowed: bool = False):
    """An argparse type: a finite number of seconds, > 0 (>= 0 where zero_allowed)."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {s!r}") from None
        if math.isinf(v) or not (v >= 0 if zero_allowed else v > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero_allowed else '>'} 0 seconds, got {s!r}")
        return v
    return parse


def crf_params_file(path: str):
    """An argparse type: CRFParams from a JSON file (crf.CRFParams.load), refused with the reason."""
    from crf import CRFParams

    try:
        return CRFParams.load(path)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def refuse_unwritable(ap: argparse.ArgumentParser, outputs: dict) -> None:
    """Before any work: ap.error (exit status 2) for the first output file that cannot be written.
    outputs: {option as typed, e.g. "--json": its path, or None where not given}."""
    from runtime.output_files import output_file_problem

    for flag, path in outputs.items():
        problem = output_file_problem(path) if path else None
        if problem:
            ap.error(f"{flag} {path}: {problem}")


def write_output(flag: str, path, data: bytes) -> bool:
    """Write an output file whole (runtime.output_files.write_bytes_atomically). False, after one
    line "error: cannot write FLAG PATH: reason" on stderr, where the file system refuses it:
    refuse_unwritable checked the place before the work, but a full disk, a read-only mount or a
    folder such as /proc shows only when the file is written."""
    import sys

    from runtime.output_files import write_bytes_atomically

    try:
        write_bytes_atomically(path, data)
    except OSError as e:
        print(f"error: cannot write {flag} {path}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


EXPORT_INSTALL = ("pip install torch --index-url https://download.pytorch.org/whl/cpu && "
                  "pip install -e '.[export]'")


def require_packages(ap: argparse.ArgumentParser, packages: tuple, purpose: str) -> None:
    """ap.error (exit status 2) naming the packages of ``packages`` that cannot be imported and how
    to install them, instead of an ImportError traceback halfway through the work."""
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        ap.error(f"{purpose} needs {', '.join(missing)} (not installed): {EXPORT_INSTALL}")
