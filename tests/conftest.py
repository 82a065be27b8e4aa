"""Fresh random inputs every run, reproducibly: each test starts from a new seed of torch's global generator, which
a failing test's report shows; ``DHO_FAST_TEST_SEED=<seed>`` replays it."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("DHO_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little") >> 1)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        seeds = [value for name, value in item.user_properties if name == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with DHO_FAST_TEST_SEED={seeds[0]}"))
