"""Why one item of a batch (an image to segment, an image to score) failed, on one line."""
from __future__ import annotations


def reason_of(error: BaseException, expected: tuple = (ValueError,)) -> str:
    """One line saying why an item failed: the message of an expected error (``expected``: theirs
    name the file), the type too for anything else ("PermissionError: ...", "MemoryError")."""
    text = " ".join(str(error).split())
    if isinstance(error, expected) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
