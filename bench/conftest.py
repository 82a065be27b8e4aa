"""Benchmark set-up shared by bench/*.py: every result records the machine, torch and backend it came from."""

import platform

import pytest
import torch


@pytest.fixture
def record(benchmark):
    """Tags a benchmark with its group and the environment, and returns it."""

    def tag(group: str, **info):
        benchmark.group = group
        benchmark.extra_info.update(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            machine=platform.processor() or platform.machine(),
            **info,
        )
        torch._dynamo.reset()
        return benchmark

    return tag
