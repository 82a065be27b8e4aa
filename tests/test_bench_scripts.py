"""The interleaved-rounds scripts of bench/ that the README quotes run as documented, on a tiny shape."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess
def test_backward_floor_reports_both_graphs():
    args = ["--n", "8", "--c", "5", "--rounds", "2", "--reps", "2", "--threads", "1"]
    result = subprocess.run([sys.executable, str(ROOT / "bench/interleaved_backward_floor.py"), *args],
                            capture_output=True, text=True, check=True)  # fmt: skip
    for graph in ("fused", "sum"):
        line = re.search(rf"^{graph}: backward adds (-?[\d.]+) us; forward\+backward / forward ([\d.]+)$",
                         result.stdout, flags=re.M)  # fmt: skip
        assert line, result.stdout
        assert float(line.group(2)) > 0
