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
