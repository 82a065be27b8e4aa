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
    # CE-only reads no teacher: one run per fraction, reported under both teachers.
    ce = {(r["teacher"], r["fraction"]): r for r in results["rows"] if r["method"] == "ce"}
    assert len(ce) == 4 and len(results["rows"]) == 12
    for fraction in (0.01, 0.1):
        assert {**ce["oracle", fraction], "teacher": "caption"} == ce["caption", fraction]
    table = (results_dir / "table.md").read_text()
    assert table.count("\n") == 2 + 4 and "| caption (" in table and "± 0.00" in table
    out = capsys.readouterr().out
    assert table in out and "kept from an earlier run" not in out
    for plot in ("gradient_conflict.png", "val_curves.png"):
        assert (results_dir / plot).read_bytes().startswith(b"\x89PNG")

    # --resume keeps every finished run: the same rows, nothing trained again.
    again = _module("run_study").main(
        ["--quick", "--resume", "--source", "digits", "--out", str(tmp_path), "--results", str(results_dir)]
    )
    assert again["rows"] == results["rows"]
    assert capsys.readouterr().out.count("kept from an earlier run") == 10


def test_a_finished_run_is_kept_only_for_the_same_settings(tmp_path):
    run_demo = _module("run_demo")
    job = {"output_dir": str(tmp_path / "run"), "seed": 0, "crop_scale": (0.85, 1.0)}
    assert run_demo.finished_row(job) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_demo.ROW_FILE).write_text(json.dumps({"job": job, "row": {"test_acc": 0.5}}))
    assert run_demo.finished_row(job) == {"test_acc": 0.5}  # the tuple reads back as a list: still the same job
    assert run_demo.finished_row({**job, "seed": 1}) is None


def test_run_length_rule_needs_every_later_doubling_converged():
    rule = _module("run_study").run_length_rule

    def val(*steps):  # validation accuracy at E = 8, 16, 32, 64 of two runs, from the gains of each doubling
        curves = {"1% dho": [0.70], "10% ce": [0.80]}
        for gain_dho, gain_ce in steps:
            curves["1% dho"].append(curves["1% dho"][-1] + gain_dho)
            curves["10% ce"].append(curves["10% ce"][-1] + gain_ce)
        return {e: {k: v[i] for k, v in curves.items()} for i, e in enumerate((8, 16, 32, 64))}

    assert rule(val((0.005, 0.01), (0.0, 0.0), (0.001, -0.01)))[1] == 8  # exactly one point still converges
    assert rule(val((0.005, 0.0), (0.018, 0.0), (0.004, 0.0)))[1] == 32  # 16 -> 32 gains: 8 and 16 fail
    assert rule(val((0.0, 0.02), (0.0, 0.0), (0.0, 0.0)))[1] == 16
    gains, epochs = rule(val((0.0, 0.0), (0.0, 0.0), (0.0, 0.015)))
    assert epochs is None and gains[32] == {"1% dho": 0.0, "10% ce": 0.015}
