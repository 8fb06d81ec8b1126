"""What the benchmark scripts share: printing a markdown table and writing it with the command that made it."""
from __future__ import annotations

import sys
from pathlib import Path


def write_table(lines: list[str], out: str | Path, module: str, argv: list[str] | None) -> str:
    """Print the table and write it to ``out`` followed by the exact command (``argv`` None: this process's own
    arguments). Returns the table text."""
    table = "\n".join(lines)
    print(table)
    args = sys.argv[1:] if argv is None else list(argv)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(table + f"\n\nCommand: `python -m {module} " + " ".join(args) + "`\n")
    return table
