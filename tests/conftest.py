"""Fresh random inputs every run, reproducibly: each test starts from a new seed of torch's global generator, which
a failing test's report shows; ``DHO_FAST_TEST_SEED=<seed>`` replays it. Also the trainer tests' shared data: the
digit trees on disk and a teacher-logits file for them, once per module."""

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


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """ImageFolder trees of scikit-learn's digits (tests/trainer_fixtures.py), imported here only when used."""
    from trainer_fixtures import digits_trees

    return digits_trees(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def logits_file(trees, tmp_path_factory):
    """Random (num_train, 4) teacher logits for ``trees``."""
    from trainer_fixtures import count_train_images, random_teacher_logits

    return random_teacher_logits(tmp_path_factory.mktemp("teacher") / "logits.pt", count_train_images(trees), 4)
