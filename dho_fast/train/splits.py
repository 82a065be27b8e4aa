"""The rules that choose a run's labelled set from the train pool's labels (METHOD.md, "The reference protocol")."""

import numbers
import random

import numpy as np

# The reference's seeds: numpy's legacy generator for the ImageNet percent split, Python's for the k-shot one.
PERCENT_SEED = 13
K_SHOT_SEED = 1


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError(f"labels must be a 1-d array of class indices >= 0, got {labels.dtype} {labels.shape}")
    if len(labels) == 0:
        raise ValueError("labels must hold at least one image, got an empty array")
    return labels


def _groups(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(class values ascending, each one's first position, each one's positions in list order)."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    # A stable sort keeps each class's positions in list order.
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    return values, first, members


def _cascade_round(targets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    # np.cumsum adds in sequence (no pairwise summation), the same float64 running sum as the reference's loop.
    running = np.cumsum(targets)
    rounded = np.where(running - np.floor(running) > 0.5, np.ceil(targets), np.floor(targets))
    return np.minimum(rounded, sizes).astype(np.int64)


def percent_split_indices(labels: np.ndarray, percent: float, seed: int = PERCENT_SEED) -> np.ndarray:
    """The reference's ImageNet ``percent``% labelled set (METHOD.md; ``percent`` 1 or 10 in the paper).

    ``labels``: (N,) integer class indices 0..C-1 in the train list's order (ImageFolder order on ImageNet), every
    class with at least one image; C = ``labels.max() + 1``, n_c the images of class c, p = ``percent / 100``.

    Per-class counts k_c: targets ``t_c = clip(N / C * p - 1, 1, n_c)``, rounded by cascade in class order (a
    running sum ``s += t_c``; ``ceil(t_c)`` when ``s - floor(s) > 0.5``, else ``floor(t_c)``; then at most n_c);
    while the rounded total is below ``N * p``, every ``t_c`` grows by ``1 / C`` (at most n_c) and is rounded again.
    All of it in float64 and in the formula's own order: ``N / C * p - 1`` left to right, the running sum in class
    order, ``1 / C`` added to the targets once per round (never ``t_c + r / C``), ``N * p`` compared as a float. The
    loop also stops once every ``t_c`` is n_c (the total is then N >= N * p anyway): at most about ``C * max(n_c)``
    rounds. (Every comparison behind the ImageNet counts below clears its threshold by 1e-5 or more, far above the
    float64 rounding error.)

    Picks: one ``np.random.RandomState(seed)``; for c = 0, 1, ..., C-1 ``choice(positions of class c in list
    order, k_c, replace=False)``. Returns (sum k_c,) int64 train indices in that pick order (class 0's picks in
    draw order, then class 1's, ...), distinct. ``percent == 100`` gives every index in list order, as the
    reference does (its unlabelled set is then a copy of the whole train set, a quirk not kept: U is empty). On
    ImageNet (N = 1,281,167): 13 per class at 1%; at 10% 128 for classes 0-713 and 129 for 714-999 (128,286).

    Raises ValueError naming ``labels`` (not 1-d integers >= 0, empty, or a class 0..C-1 without images) or
    ``percent`` (not a number in (0, 100]).
    """
    labels = _check_labels(labels)
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real) or not 0 < percent <= 100:
        raise ValueError(f"percent must be a number in (0, 100], got {percent!r}")
    if percent == 100:
        return np.arange(len(labels), dtype=np.int64)  # the reference returns the whole list, in its order
    sizes = np.bincount(labels)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        raise ValueError(
            f"labels must give every class 0..{len(sizes) - 1} an image (C = labels.max() + 1), class {empty[0]} "
            "has none"
        )
    num_images, num_classes, p = len(labels), len(sizes), percent / 100
    goal = num_images * p
    limits = sizes.astype(np.float64)
    targets = np.clip(num_images / num_classes * p - 1, 1.0, limits)
    counts = _cascade_round(targets, limits)
    while counts.sum() < goal and (targets < limits).any():
        targets = np.minimum(targets + 1 / num_classes, limits)
        counts = _cascade_round(targets, limits)
    rs = np.random.RandomState(seed)
    _, _, members = _groups(labels)
    picks = [rs.choice(m, k, replace=False) for m, k in zip(members, counts, strict=True)]
    return np.concatenate(picks).astype(np.int64)


def k_shot_indices(labels: np.ndarray, shots: int, seed: int = K_SHOT_SEED) -> np.ndarray:
    """The reference's few-shot labelled set: ``shots`` images per class (METHOD.md, CoOp's sampler with repeats).

    ``labels``: (N,) integer class indices >= 0 in the train list's order. One ``random.Random(seed)``; classes in
    order of first appearance in ``labels``; per class ``rng.sample(positions, shots)`` (positions of the class in
    list order), or ``rng.choices(positions, k=shots)`` when the class has fewer than ``shots`` images, so a short
    class repeats images (as the reference keeps them: such an image is seen that many times per pass over L).

    Returns (C * shots,) int64 train indices in pick order (first-appearing class's picks in draw order, then the
    next class's, ...); repeats only within a class shorter than ``shots``. Raises ValueError naming ``labels``
    (not 1-d integers >= 0, or empty) or ``shots`` (not an integer >= 1).
    """
    labels = _check_labels(labels)
    if isinstance(shots, bool) or not isinstance(shots, numbers.Integral) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    shots = int(shots)
    rng = random.Random(seed)
    _, first, members = _groups(labels)
    chosen: list[int] = []
    for c in np.argsort(first):
        positions = members[c].tolist()
        chosen += rng.sample(positions, shots) if len(positions) >= shots else rng.choices(positions, k=shots)
    return np.array(chosen, dtype=np.int64)


def class_balanced_indices(
    labels: np.ndarray, *, fraction: float | None = None, num_labelled: int | None = None, seed: int = 13
) -> np.ndarray:
    """A class-balanced labelled set of an exact total: every class gets ``total // C`` images and ``total % C``
    classes (chosen with the seed) one more, drawn without replacement; sorted int64 indices.

    ``labels``: (N,) integer class indices >= 0; C = the number of distinct labels; ``total`` is ``num_labelled``
    or ``round(fraction * N)`` (``fraction == 1``: every index). Not the reference's rule: that is
    :func:`percent_split_indices` (its total only approximates ``N * p``); this one is the exact-total alternative
    (``num_labelled = 128286`` gives 128 or 129 per class like the reference's 10%, but its 286 classes with 129 are
    drawn with the seed, not classes 714-999, and the images differ).

    Raises ValueError naming ``labels``, ``fraction`` (not in (0, 1]), ``num_labelled`` (not in [1, N]), both or
    neither given, or a class with fewer images than its share.
    """
    labels = _check_labels(labels)
    if (fraction is None) == (num_labelled is None):
        raise ValueError("give exactly one of fraction and num_labelled")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if fraction == 1:
            return np.arange(len(labels), dtype=np.int64)
        num_labelled = max(1, round(fraction * len(labels)))
    classes = np.unique(labels)
    if not 1 <= num_labelled <= len(labels):
        raise ValueError(f"num_labelled must be in [1, {len(labels)}], got {num_labelled}")
    rng = np.random.default_rng(seed)
    per_class = np.full(len(classes), num_labelled // len(classes))
    per_class[rng.permutation(len(classes))[: num_labelled % len(classes)]] += 1
    chosen = []
    for c, k in zip(classes, per_class, strict=True):
        members = np.flatnonzero(labels == c)
        if k > len(members):
            raise ValueError(f"class {c} has {len(members)} images, fewer than its {k} labelled images")
        chosen.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)
