"""What every benchmark ends with: its numbers as JSON and its table as markdown in bench/results, atomically."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(dest: Path, name: str, res: dict, lines: list[str]) -> None:
    """bench/results/NAME.json (the numbers and the command) and NAME.md (the table); prints the table."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from raystack.atomic import atomic_write_text

    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / f"{name}.json", json.dumps(res, indent=2))
    atomic_write_text(dest / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
