"""bench/report.py and bench/memory.py, the parts of the benchmark suite whose arithmetic a wrong README table would
hide: ratios are medians of per-round ratios, the generated section replaces only itself, peak memory counts what a
call holds at once."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory  # noqa: E402
import report  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cpu_kernel_isa": "avx2", "aten_cpu_capability": "AVX2", "threads": 2,
           "torch": "2.x", "device": "cpu"}  # fmt: skip


def record(op="dual_head_loss", **times):
    case = {"mode": "forward+backward", "N": 512, "C": 1000, "dtype": "float32"}
    return {"op": op, "case": case, "machine": MACHINE, "rounds": 3, "times_s": times,
            "peak_bytes": {name: 2**20 * (k + 1) for k, name in enumerate(times)}}  # fmt: skip


def test_a_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # Per-round eager / fused: 2, 3, 1 -> median 2; the ratio of the medians would be 3 / 1 = 3.
    r = record(**{"fused-cpu": [1.0, 1.0, 10.0], "eager": [2.0, 3.0, 10.0], "copy": [0.5, 0.25, 5.0]})
    table = report.ratio_table([r])
    assert table[0] == "| mode | N | C | dtype | eager / fused-cpu | share of copy | peak fused-cpu / eager |"
    # share of copy: per-round copy / fused = 0.5, 0.25, 0.5 -> 0.5; peak: 1 MiB / 2 MiB.
    assert table[2] == "| forward+backward | 512 | 1000 | float32 | 2.00 | 0.50 | 0.5 |"


def test_the_yardsticks_that_divide_the_fused_time():
    r = record(**{"fused-cpu": [2.0, 2.0, 2.0], "gemms": [1.0, 1.0, 1.6], "forward-only": [1.6, 1.6, 1.6]})
    header, _, row = report.ratio_table([r])
    assert "fused-cpu / gemms" in header and "fused-cpu / forward-only" in header
    assert row.endswith("| 2.00 | 1.25 |  |")  # no eager: no memory ratio


def test_train_step_table_reports_images_per_second_and_the_loss_share():
    r = record("train_step", fused=[0.1, 0.1, 0.1], eager=[0.2, 0.3, 0.2], **{"fused-loss": [0.02] * 3,
               "eager-loss": [0.1, 0.1, 0.1]})  # fmt: skip
    row = report.train_step_table([r])[2]
    assert row == "| 1000 | 5120 | 2560 | 2.00 | 20.0% | 50.0% |"


def test_report_names_the_machine_and_loads_only_suite_cases(tmp_path):
    path = tmp_path / "bench.json"
    r = record(**{"fused-cpu": [1.0] * 3, "eager": [2.0] * 3})
    path.write_text(json.dumps({"benchmarks": [{"extra_info": r}, {"extra_info": {"provider": "old"}}]}))
    records = report.load([str(path)])
    assert records == [r]
    text = report.report(records)
    assert "Test CPU, dho_fast CPU kernels avx2 (ATen AVX2), 2 threads" in text
    assert "| forward+backward | 512 | 1000 | float32 | 2.00 |" in text


def test_replace_section_keeps_the_rest_of_the_readme():
    readme = f"intro\n{report.BEGIN}\nold table\n{report.END}\nafter\n"
    assert report.replace_section(readme, "new\n") == f"intro\n{report.BEGIN}\nnew\n{report.END}\nafter\n"
    with pytest.raises(ValueError, match="bench-report:begin"):
        report.replace_section("no markers\n", "new\n")


def test_the_readme_has_the_generated_section():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme.count(report.BEGIN) == 1 and readme.count(report.END) == 1


def test_peak_memory_counts_what_a_call_holds_at_once():
    mib = 2**20 // 4  # float32 entries

    def step():
        a = torch.ones(mib)  # 1 MiB held ...
        b = torch.ones(2 * mib)  # ... while 2 MiB more are allocated: peak 3 MiB
        del a, b
        torch.ones(mib)  # freed at once; the peak stays 3 MiB

    assert memory.peak_bytes(step, torch.device("cpu")) == 3 * 2**20
    assert memory.peak_bytes(lambda: None, torch.device("cpu")) == 0
