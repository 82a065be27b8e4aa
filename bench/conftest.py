"""The benchmark suite's shared fixture: every case times all its providers in interleaved rounds (bench/interleaved.py)
inside one pytest-benchmark test, measures each provider's peak memory, and records both with the machine it ran on.

    .venv/bin/python -m pytest bench/bench_*.py --benchmark-only --benchmark-json=bench/results/bench.json
    .venv/bin/python -m pytest bench/bench_*.py --benchmark-disable     # each file's first case once (CI)
    --bench-device cuda                                                   # default: cuda when a GPU is present

A case's pytest-benchmark statistics are those of a whole round (every provider once); the figures to read are in
its ``extra_info``: per-provider times of every round (``times_s``), so that a ratio can be the median of per-round
ratios (bench/report.py), and peak memory (``peak_bytes``).
"""

import os
import platform
import random
from collections.abc import Callable

import pytest
import torch
from interleaved import run_round
from memory import peak_bytes

from dho_fast.ops import extension


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-device",
        choices=("cpu", "cuda"),
        default=None,
        help="device of the benchmark tensors (default: cuda when torch sees a GPU, else cpu)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With --benchmark-disable (CI's smoke run) only the first case of each benchmark function runs: every file and
    every provider is exercised once without the suite's whole run time."""
    if not config.getoption("benchmark_disable"):
        return
    seen: set[tuple[str, str]] = set()
    keep, drop = [], []
    for item in items:
        key = (item.path.name, getattr(item, "originalname", item.name))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    name = pytestconfig.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: torch sees no GPU", returncode=2)
    return torch.device(name)


def machine(device: torch.device) -> dict[str, object]:
    """What a figure depends on: CPU model, the instruction set dho_fast's CPU kernels chose (and ATen's), whether
    ``$ATEN_CPU_CAPABILITY`` capped both (e.g. the AVX2 kernels timed on an AVX-512 CPU), threads, torch, and the GPU
    when the device is one."""
    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "cpu_kernel_isa": extension.cpu_kernel_isa(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_cap": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@pytest.fixture
def interleaved(benchmark, device: torch.device) -> Callable[..., None]:
    """``interleaved(op, case, steps, rounds=..., warmup_rounds=...)`` runs ``steps`` ({provider: zero-argument
    callable}) in interleaved rounds and records the case. ``case`` names the shape, dtype and mode; the group is
    ``op`` and ``case`` together, so that pytest-benchmark's own table keeps cases apart."""

    def run(op: str, case: dict[str, object], steps: dict[str, Callable[[], object]], *, rounds: int,
            warmup_rounds: int = 3) -> None:  # fmt: skip
        # Each case's torch.compile provider compiles afresh for its own shape: with the cache of earlier cases,
        # dynamo would mark the changed sizes dynamic and time a dynamic-shape graph instead.
        torch._dynamo.reset()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        rng = random.Random(0)  # seeded: two runs shuffle alike
        times: dict[str, list[float]] = {name: [] for name in steps}

        benchmark.group = f"{op} " + " ".join(f"{k}={v}" for k, v in case.items())
        benchmark.pedantic(
            run_round, args=(steps, times, rng, sync), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1
        )
        # pytest-benchmark calls the round warmup_rounds times first, or once in all when it is disabled.
        timed = {name: t[-rounds:] for name, t in times.items()}
        benchmark.extra_info.update(
            op=op,
            case=case,
            machine=machine(device),
            rounds=len(next(iter(timed.values()))),
            times_s=timed,
            peak_bytes={name: peak_bytes(step, device) for name, step in steps.items()},
        )

    return run
