"""The embedded demo and the study run end to end and learn: on scikit-learn's 8x8 digits (their offline fallback,
small enough for a test) with their own settings and fewer steps."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each trains students in worker processes

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
CHANCE = 0.1


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, DEMO_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the worker processes import it by name
    spec.loader.exec_module(module)
    return module


def test_demo_learns(tmp_path, capsys):
    results = _module("run_demo").main(
        ["--source", "digits", "--out", str(tmp_path), "--epochs", "4", "--teacher-epochs", "20", "--seed", "1",
         "--json", str(tmp_path / "results.json")]
    )  # fmt: skip
    assert json.loads((tmp_path / "results.json").read_text()) == results
    # The VLM-like teacher: better than chance, worse than a teacher fitted on the task's labels (module teachers).
    assert 3 * CHANCE < results["teacher_test_acc"] < 0.95
    rows = {(r["fraction"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(f, m) for f in (0.01, 0.1) for m in ("dho", "kd", "ce")}
    for row in rows.values():
        assert row["test_acc"] > 3 * CHANCE, row
        assert row["val_curve"][-1][0] == 4  # an evaluation at each epoch end
    for fraction in (0.01, 0.1):
        dho = rows[fraction, "dho"]
        # The grid holds alpha = 0 (KD head alone) and 1 (CE head alone): the chosen blend is at least as good.
        assert dho["val_acc"] >= max(dho["val_acc_ce_head"], dho["val_acc_kd_head"]), dho
        assert 0 <= dho["alpha"] <= 1 and dho["beta"] > 0
    table = capsys.readouterr().out
    num_train = results["num_train"]
    assert f"| 1% ({round(0.01 * num_train)}) | dho |" in table and f"| 10% ({round(0.1 * num_train)}) | ce |" in table
    assert "standing in for a vision-language model" in table


def test_study_quick_mode(tmp_path, capsys):
    results_dir = tmp_path / "results"
    results = _module("run_study").main(
        ["--quick", "--source", "digits", "--out", str(tmp_path), "--results", str(results_dir)]
    )
    assert json.loads((results_dir / "results.json").read_text()) == results
    assert results["seeds"] == [0] and results["steps_cap"] == 6
    keys = {f"{t}/{f:g}/{m}" for t in ("oracle", "caption") for f in (0.01, 0.1) for m in ("dho", "kd", "ce")}
    assert set(results["summary"]) == keys
    for row in results["rows"]:
        assert row["steps"] == 6
        if row["method"] == "ce":
            assert row["gradient_conflict"] == []
        else:  # logged every 25 steps and at the last: one record, both cosines defined
            ((step, cos_features, cos_backbone),) = row["gradient_conflict"]
            assert step == 6 and -1 <= cos_features <= 1 and -1 <= cos_backbone <= 1
    table = (results_dir / "table.md").read_text()
    assert table.count("\n") == 2 + 4 and "| caption (" in table and "± 0.00" in table
    assert table in capsys.readouterr().out
    for plot in ("gradient_conflict.png", "val_curves.png"):
        assert (results_dir / plot).read_bytes().startswith(b"\x89PNG")
