"""Argument types shared by the command-line tools."""
from __future__ import annotations

import argparse


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


def crf_params_file(path: str):
    """An argparse type: CRFParams from a JSON file (crf.CRFParams.load), refused with the reason."""
    from crf import CRFParams

    try:
        return CRFParams.load(path)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
