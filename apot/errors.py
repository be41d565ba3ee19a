"""How apot reports bad input (a config, data, a checkpoint, a flag) to a person: one line, no traceback.

Every command-line entry point (``tune_sweep.py``, ``python -m apot.train``, ``python -m apot.export``,
``python -m apot.data``) ends a refused run through `exit_with_error`: ``error: <what is wrong and how to fix
it>`` on stderr, and a non-zero exit code.
"""

from __future__ import annotations

import sys


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def exit_with_error(message: object, code: int = 2) -> int:
    """Print ``error: <message>`` as one line on stderr; return ``code`` (2: bad usage or input)."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return code
