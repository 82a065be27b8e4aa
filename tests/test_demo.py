"""The embedded demo learns: run on scikit-learn's 8x8 digits (its offline fallback, small enough for a test) with
the demo's own settings and fewer steps."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the demo trains nine students

DEMO = Path(__file__).resolve().parents[1] / "demo" / "run_demo.py"
CHANCE = 0.1


def _demo_module():
    spec = importlib.util.spec_from_file_location("run_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_learns(tmp_path, capsys):
    results = _demo_module().main(
        [
            "--source",
            "digits",
            "--out",
            str(tmp_path),
            "--steps",
            "60",
            "--teacher-epochs",
            "20",
            "--seed",
            "1",
            "--json",
            str(tmp_path / "results.json"),
        ]
    )
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["teacher_test_acc"] > 0.9
    rows = {(r["fraction"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(f, m) for f in (0.01, 0.1) for m in ("dho", "kd", "ce")}
    for row in rows.values():
        assert row["test_acc"] > 3 * CHANCE, row
    for fraction in (0.01, 0.1):
        dho = rows[fraction, "dho"]
        # The grid holds alpha = 0 (KD head alone) and 1 (CE head alone): the chosen blend is at least as good.
        assert dho["val_acc"] >= max(dho["val_acc_ce_head"], dho["val_acc_kd_head"]), dho
        assert 0 <= dho["alpha"] <= 1 and dho["beta"] > 0
    table = capsys.readouterr().out
    assert "| 1% (11) | dho |" in table and "| 10% (115) | ce |" in table  # round(fraction * 1149) labels
    assert "stands in for a vision-language model" in table
