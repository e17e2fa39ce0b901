"""How big a research run is. Full size by default; with IMMUNIZE_RESEARCH_SMOKE=DIR a smoke run: one step of
everything (hardening, erasing, the attack, 1-2 samples per score), rows and work folders under DIR, so CI can
show that every probe still runs (tests/test_research_smoke.py) without touching the committed results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

SMOKE_DIR = os.environ.get("IMMUNIZE_RESEARCH_SMOKE")


def n(full: int, smoke: int = 1) -> int:
    """A size: `full`, or `smoke` in a smoke run."""
    return smoke if SMOKE_DIR else full


def attack_steps() -> int | None:
    """Steps of the scoring attack: the method's default, or 2 in a smoke run."""
    return 2 if SMOKE_DIR else None


def results(name: str) -> Path:
    """Where a probe's rows and tables go: research/imma/results/, or the smoke folder."""
    return (Path(SMOKE_DIR) if SMOKE_DIR else HERE / "results") / name


def work(name: str) -> Path:
    """Scratch folders (hardened models, attacks): runs/NAME, or under the smoke folder."""
    return (Path(SMOKE_DIR) if SMOKE_DIR else ROOT / "runs") / name


def shared_data() -> Path:
    """bench/effectiveness.py's data folders (protect, attacker, legal-all), made here if missing."""
    from bench.effectiveness import prepare_data

    return prepare_data(work("bench-effectiveness") / "data")
