"""The shipped tiny world meets its bar: trained concepts >= 80% fully right, held-out <= 15%."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.e2e


def test_quality_command_meets_both_numbers(tmp_path):
    res = CliRunner().invoke(app, ["world", "quality", "--samples", "64", "--json", str(tmp_path / "q.json")])
    report = json.loads((tmp_path / "q.json").read_text())
    assert "trained concepts fully right" in res.output and "held-out concepts rendered" in res.output
    assert report["trained_accuracy"] >= 0.80, report
    assert report["held_out_accuracy"] <= 0.15, report
    assert all(f["samples"] >= 64 for f in report["families"])
    assert res.exit_code == 0
