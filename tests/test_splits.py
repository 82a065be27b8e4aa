"""The labelled-set rules (the reference's ImageNet percent split and k-shot sampling, the exact-total
class-balanced split), checked image for image against independent plain-Python versions of METHOD.md's text, and
what the trainer does with a k-shot set that repeats images (its complement and the batch sampler)."""

import math
import random
from collections import Counter

import numpy as np
import pytest

from dho_fast.train.data import complement
from dho_fast.train.sampling import PairedBatchSampler
from dho_fast.train.splits import class_balanced_indices, k_shot_indices, percent_split_indices

IMAGENET_IMAGES = 1_281_167


def imagenet_like_labels(seed: int = 0) -> np.ndarray:
    """1000 classes of 732..1300 images (ImageNet's range), most of them full, shuffled."""
    rng = np.random.default_rng(seed)
    sizes = np.where(rng.random(1000) < 0.9, 1300, rng.integers(732, 1300, 1000))
    return rng.permutation(np.repeat(np.arange(1000), sizes))


def imagenet_sized_class_sizes(variant: int) -> np.ndarray:
    """1000 class sizes in 732..1300 (most 1300) that add up to ImageNet's 1,281,167 train images; each variant
    shortens other classes."""
    sizes = np.full(1000, 1300)
    if variant == 0:  # 100 classes short by 188 or 189
        sizes[3::10] -= 188
        sizes[3:333:10] -= 1
    else:  # 33 classes at ImageNet's minimum of 732, one at 1211
        sizes[np.arange(33) * 29 + 5] = 732
        sizes[999] = 1211
    assert sizes.sum() == IMAGENET_IMAGES and sizes.min() >= 732
    return sizes


def reference_percent_split(labels: np.ndarray, percent: float, seed: int = 13) -> list[int]:
    """METHOD.md's ImageNet rule in plain Python floats and lists; the picks in the rule's permutation form."""
    labels = [int(y) for y in labels]
    n = len(labels)
    if percent >= 100:
        return list(range(n))  # the reference's 100% case: the whole list as it is
    num_classes = max(labels) + 1
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        members[y].append(i)
    p = percent / 100
    targets = [min(max(n / num_classes * p - 1, 1.0), float(len(m))) for m in members]
    while True:
        running, counts = 0.0, []
        for target, m in zip(targets, members, strict=True):
            running += target
            rounded = math.ceil(target) if running - math.floor(running) > 0.5 else math.floor(target)
            counts.append(min(rounded, len(m)))
        if sum(counts) >= n * p:
            break
        targets = [min(target + 1 / num_classes, float(len(m))) for target, m in zip(targets, members, strict=True)]
    rs = np.random.RandomState(seed)
    picks = []
    for m, k in zip(members, counts, strict=True):
        picks += [m[j] for j in rs.permutation(len(m))[:k]]
    return picks


def reference_k_shot(labels: np.ndarray, shots: int, seed: int) -> list[int]:
    """METHOD.md's k-shot rule: a dict keeps the classes in order of first appearance."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        by_class.setdefault(y, []).append(i)
    picks = []
    for items in by_class.values():
        picks += rng.sample(items, shots) if len(items) >= shots else rng.choices(items, k=shots)
    return picks


def shuffled_labels(sizes: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))


PERCENT_CASES = {
    "sorted": np.repeat(np.arange(7), [30, 41, 5, 120, 77, 64, 90]),
    "shuffled": shuffled_labels([30, 41, 5, 120, 77, 64, 90], 1),
    "tiny classes": shuffled_labels([1, 1, 2, 3, 400, 1, 250], 2),  # the clips at 1 and at n_c bind
    "one class": np.zeros(37, dtype=np.int64),
    "one image each": np.arange(9)[::-1].copy(),
    "many classes": shuffled_labels(list(np.random.default_rng(3).integers(1, 60, 300)), 3),
}


@pytest.mark.parametrize("percent", [1, 10, 50, 100, 0.5, 33.3])
@pytest.mark.parametrize("case", list(PERCENT_CASES))
def test_percent_split_matches_the_rule_image_for_image(case, percent):
    labels = PERCENT_CASES[case]
    for seed in (13, 4):
        chosen = percent_split_indices(labels, percent, seed)
        assert chosen.dtype == np.int64 and len(np.unique(chosen)) == len(chosen)
        assert chosen.tolist() == reference_percent_split(labels, percent, seed)
        if percent == 100:
            assert chosen.tolist() == list(range(len(labels)))  # the whole list, in its order
        else:
            assert np.all(np.diff(labels[chosen]) >= 0)  # class 0's picks first, then class 1's, ...


@pytest.mark.parametrize("percent", [1, 10])
def test_percent_split_matches_the_rule_at_imagenet_size(percent):
    labels = imagenet_like_labels()  # shuffled: each class's positions are scattered over the list
    assert percent_split_indices(labels, percent).tolist() == reference_percent_split(labels, percent)


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("shuffle", [False, True])
def test_percent_split_imagenet_counts(variant, shuffle):
    """METHOD.md's ImageNet result: the counts depend only on N and C while no class is short of its count."""
    labels = np.repeat(np.arange(1000), imagenet_sized_class_sizes(variant))
    if shuffle:
        labels = np.random.default_rng(variant).permutation(labels)
    one = np.bincount(labels[percent_split_indices(labels, 1)], minlength=1000)
    assert one.tolist() == [13] * 1000 and one.sum() == 13_000
    ten = percent_split_indices(labels, 10)
    counts = np.bincount(labels[ten], minlength=1000)
    assert counts.tolist() == [128] * 714 + [129] * 286 and len(ten) == 128_286 == len(np.unique(ten))


def test_percent_split_by_hand():
    # 4 classes (exact binary steps of 1/4): targets 3 -> 3.25 -> 3.5 -> 3.75 -> 4; the totals 12, 13, 12, 13 stay
    # below N * p = 16 (a running sum at exactly .5 rounds down) until every class gets 4.
    labels = np.repeat(np.arange(4), 8)
    assert np.bincount(labels[percent_split_indices(labels, 50)]).tolist() == [4, 4, 4, 4]
    # N / C * p - 1 < 1: every class still gets one image.
    assert np.bincount(labels[percent_split_indices(labels, 0.5)]).tolist() == [1, 1, 1, 1]
    # A running sum of exactly .5 rounds down: targets 2.5 give 2 + 2 and 3.5 give 3 + 3, below 7; then 4 + 4.
    labels = np.repeat(np.arange(2), 7)
    assert np.bincount(labels[percent_split_indices(labels, 50)]).tolist() == [4, 4]
    # Classes 0-2 clip at their sizes; class 3 grows alone until 1 + 1 + 2 + 12 reaches 16 (target 11.75).
    labels = np.repeat(np.arange(4), [1, 1, 2, 28])
    assert np.bincount(labels[percent_split_indices(labels, 50)]).tolist() == [1, 1, 2, 12]
    # The picks of each class in the legacy generator's order, from the one generator.
    labels = np.array([1, 0, 1, 0, 0, 1, 1, 0])
    rs = np.random.RandomState(13)
    class_0, class_1 = np.array([1, 3, 4, 7]), np.array([0, 2, 5, 6])
    want = np.concatenate([rs.choice(class_0, 1, replace=False), rs.choice(class_1, 1, replace=False)])
    np.testing.assert_array_equal(percent_split_indices(labels, 25), want)


def test_percent_split_seed():
    labels = PERCENT_CASES["shuffled"]
    np.testing.assert_array_equal(percent_split_indices(labels, 10), percent_split_indices(labels, 10, 13))
    assert not np.array_equal(percent_split_indices(labels, 10, 13), percent_split_indices(labels, 10, 14))


@pytest.mark.parametrize("percent", [0, -1, 100.5, float("nan"), "10", True, None])
def test_percent_split_rejects_percent(percent):
    with pytest.raises(ValueError, match="percent must be a number in"):
        percent_split_indices(np.arange(4), percent)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 2, 2]), "class 1 has none"),
        (np.array([[0, 1]]), "labels must be a 1-d array"),
        (np.array([0.0, 1.0]), "labels must be a 1-d array"),
        (np.array([0, -1]), "labels must be a 1-d array"),
        (np.array([], dtype=np.int64), "labels must hold at least one image"),
    ],
)
def test_percent_split_rejects_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        percent_split_indices(labels, 10)


K_SHOT_CASES = {
    "sorted": np.repeat(np.arange(5), 20),
    "first appearance": np.array([3, 3, 0, 1, 3, 0, 2, 2, 1, 0, 0, 3, 1, 2, 1, 0]),
    "short classes": shuffled_labels([20, 1, 3, 16, 2, 40], 5),
    "sparse labels": np.array([9, 4, 4, 9, 9, 4, 7, 9, 7, 7, 4, 9]),
}


@pytest.mark.parametrize("shots", [1, 2, 4, 16])
@pytest.mark.parametrize("case", list(K_SHOT_CASES))
def test_k_shot_matches_the_rule_image_for_image(case, shots):
    labels = K_SHOT_CASES[case]
    for seed in (1, 2, 77):
        chosen = k_shot_indices(labels, shots, seed)
        assert chosen.dtype == np.int64 and chosen.tolist() == reference_k_shot(labels, shots, seed)


def test_k_shot_by_hand():
    labels = np.array([2, 2, 0, 0, 0, 1])
    chosen = k_shot_indices(labels, 2, seed=1)
    assert labels[chosen].tolist() == [2, 2, 0, 0, 1, 1]  # classes in order of first appearance, not sorted
    assert sorted(chosen[:2].tolist()) == [0, 1] and chosen[4:].tolist() == [5, 5]  # class 1's one image twice
    short = k_shot_indices(np.array([0] * 10 + [1, 1]), 5, seed=3)
    assert len(short) == 10 and set(short[5:].tolist()) <= {10, 11}
    assert len(set(short[:5].tolist())) == 5 and len(set(short[5:].tolist())) < 5  # repeats only in the short class
    exact = k_shot_indices(np.array([0, 1, 0, 1, 0]), 3, seed=1)  # class 0 has exactly 3: drawn without repeats
    assert sorted(exact[:3].tolist()) == [0, 2, 4] and len(exact) == 6 and set(exact[3:].tolist()) <= {1, 3}
    assert k_shot_indices(np.array([5, 5, 5]), 1, seed=1).tolist() in ([0], [1], [2])


def test_k_shot_seed():
    labels = K_SHOT_CASES["short classes"]
    np.testing.assert_array_equal(k_shot_indices(labels, 4), k_shot_indices(labels, 4, seed=1))
    assert not np.array_equal(k_shot_indices(labels, 4, seed=1), k_shot_indices(labels, 4, seed=2))


@pytest.mark.parametrize("shots", [0, -1, 1.5, True, "2"])
def test_k_shot_rejects_shots(shots):
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        k_shot_indices(np.arange(4), shots)


@pytest.mark.parametrize("labels", [np.array([[0, 1]]), np.array([0.5]), np.array([1, -2]), np.array([], dtype=int)])
def test_k_shot_rejects_labels(labels):
    with pytest.raises(ValueError, match="labels must"):
        k_shot_indices(labels, 1)


def test_repeating_labelled_set_complement_and_sampler():
    labelled = np.array([7, 3, 3, 9, 0, 7, 3])  # unsorted, 3 three times and 7 twice
    rest = complement(labelled, 12)
    assert rest.dtype == np.int64 and rest.tolist() == [1, 2, 4, 5, 6, 8, 10, 11]
    for unlabelled, batch in ((rest, 8), (rest[:0], 0)):
        sampler = PairedBatchSampler(
            labelled, unlabelled, labelled_batch=7, unlabelled_batch=batch, total_steps=3, seed=0
        )
        rows = [key for keys in sampler for key in keys]
        for step in range(3):  # each step is one pass over L: every entry once, so a repeated image repeats
            passed = rows[step * (7 + batch) : step * (7 + batch) + 7]
            assert all(labelled_row for _, _, labelled_row in passed)
            assert Counter(i for i, _, _ in passed) == Counter(labelled.tolist())
    # The same for a k-shot set with a short class, as build_data makes it.
    labels = np.array([0, 0, 0, 0, 1, 0, 0])
    chosen = k_shot_indices(labels, 3, seed=1)
    assert Counter(chosen.tolist())[4] == 3 and complement(chosen, 7).tolist() == sorted(set(range(7)) - set(chosen))
    sampler = PairedBatchSampler(
        chosen, complement(chosen, 7), labelled_batch=6, unlabelled_batch=1, total_steps=1, seed=0
    )
    assert Counter(i for i, _, is_labelled in next(iter(sampler)) if is_labelled) == Counter(chosen.tolist())


def test_class_balanced_imagenet_totals():
    labels = imagenet_like_labels()
    for total, low, high, num_high in ((13_000, 13, 13, 1000), (128_286, 128, 129, 286)):
        chosen = class_balanced_indices(labels, num_labelled=total, seed=13)
        counts = np.bincount(labels[chosen], minlength=1000)
        assert len(chosen) == total == len(np.unique(chosen))
        assert counts.min() == low and counts.max() == high and (counts == high).sum() == num_high


def test_class_balanced_is_deterministic_per_seed():
    labels = imagenet_like_labels()
    a = class_balanced_indices(labels, num_labelled=13_000, seed=13)
    b = class_balanced_indices(labels, num_labelled=13_000, seed=13)
    c = class_balanced_indices(labels, num_labelled=13_000, seed=14)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rest = complement(a, len(labels))
    assert len(rest) + len(a) == len(labels) and not np.intersect1d(rest, a).size


def test_class_balanced_fraction():
    labels = np.repeat(np.arange(10), 100)
    chosen = class_balanced_indices(labels, fraction=0.1, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [10] * 10
    np.testing.assert_array_equal(class_balanced_indices(labels, fraction=1.0), np.arange(1000))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_labelled=0), "num_labelled"),
        (dict(fraction=1.5), "fraction"),
        (dict(fraction=0.1, num_labelled=3), "exactly one"),
        (dict(num_labelled=30), "fewer than"),
    ],
)
def test_class_balanced_errors(kwargs, message):
    labels = np.array([0] * 40 + [1] * 2)
    with pytest.raises(ValueError, match=message):
        class_balanced_indices(labels, **kwargs)
