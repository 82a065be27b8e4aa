"""ActiveKD's baseline selections: random, entropy, BADGE and class-balanced (METHOD.md).

Each docstring says where it departs from the reference implementation (erjui/PCoreSet ``strategies.py``) and why.
All take the pool's DHO blends (:func:`~dho_fast.select.blend_probs`) or features as (N, C) / (N, D) float tensors
and return (budget,) int64 CPU pool indices in pick order, distinct; budget 0 gives an empty tensor, budget > N a
ValueError. Randomness comes only from the ``generator`` passed in.
"""

from collections import Counter
from fractions import Fraction

import torch

from dho_fast.ops.validation import check_int
from dho_fast.select.checks import (
    check_budget,
    check_finite_rows,
    check_generator,
    check_matrix,
    check_same_rows,
    default_chunk_rows,
    describe,
)


def random(pool_size: int, budget: int, *, generator: torch.Generator) -> torch.Tensor:
    """The first ``budget`` entries of ``torch.randperm(pool_size, generator=generator)``.

    As the reference, except that its randomness is the caller's generator instead of torch's global one, so a
    round's picks are reproducible from its seed whatever ran before.
    """
    check_int("pool_size", pool_size, ">= 0", lambda v: v >= 0)
    check_budget(budget, pool_size)
    check_generator(generator)
    return torch.randperm(pool_size, generator=generator)[:budget]


def entropy_scores(pool_probs: torch.Tensor) -> torch.Tensor:
    """(N,) float64 ``H(p) = -sum_c p_c log p_c`` of each row, with ``0 log 0 = 0`` (``torch.special.entr``)."""
    scores = torch.empty(pool_probs.shape[0], dtype=torch.float64, device=pool_probs.device)
    rows = default_chunk_rows(pool_probs.shape[1])
    for start in range(0, pool_probs.shape[0], rows):
        scores[start : start + rows] = torch.special.entr(pool_probs[start : start + rows].double()).sum(dim=1)
    return scores


def entropy(pool_probs: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``budget`` pool points of highest entropy of the blend, highest first, ties to the lowest pool index.

    ``pool_probs``: (N, C) float probabilities (finite, >= 0); entropies in float64 with ``0 log 0 = 0``. The
    reference computes ``-sum p log(p + 1e-10)`` in float32, which changes the terms of probabilities near 1e-10 and
    below (a blend over many classes has many), and sorts with an unstable sort (ties in any order on a GPU); here
    the exact convention and a stable sort make the order a function of the values alone.
    """
    check_matrix("pool_probs", pool_probs)
    check_budget(budget, pool_probs.shape[0])
    check_finite_rows("pool_probs", pool_probs, probabilities=True)
    order = torch.sort(entropy_scores(pool_probs), descending=True, stable=True).indices
    return order[:budget].cpu()


def _badge_terms(p: torch.Tensor, f: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions ``y = argmax p`` and float64 ``|g|^2 = |a|^2 |f|^2``, ``|a|^2 = 1 - 2 p[y] + |p|^2``, of the
    gradient embeddings ``g = (onehot(y) - p) (x) f``."""
    n = p.shape[0]
    y = torch.empty(n, dtype=torch.int64, device=p.device)
    sq_g = torch.empty(n, dtype=torch.float64, device=p.device)
    for start in range(0, n, rows):
        pc, fc = p[start : start + rows].double(), f[start : start + rows].double()
        yc = pc.argmax(dim=1)
        y[start : start + rows] = yc
        sq_a = 1 - 2 * pc.gather(1, yc[:, None])[:, 0] + pc.square().sum(dim=1)
        sq_g[start : start + rows] = sq_a * fc.square().sum(dim=1)
    return y, sq_g


def badge(
    pool_probs: torch.Tensor, pool_features: torch.Tensor, budget: int, *, generator: torch.Generator
) -> torch.Tensor:
    """BADGE (Ash et al., 2020): k-means++ seeding on gradient embeddings ``g_i = (onehot(y_i) - p_i) (x) f_i``.

    ``pool_probs`` (N, C) blends (``y_i = argmax p_i``, the first maximum), ``pool_features`` (N, D) penultimate
    features, float. The first pick is the point of largest ``||g||`` (lowest index on ties), as BADGE's code
    (``init_centers``) does; each next pick is drawn with probability proportional to its squared distance to the
    nearest pick, ``D^2`` sampling as the paper defines it (uniformly among the unpicked points if every ``D^2`` is 0,
    e.g. one-hot predictions, where ``g = 0``). The (N, C D) embeddings are never formed: with ``a = onehot(y) - p``,
    ``||g_i - g_j||^2 = |a_i|^2 |f_i|^2 + |a_j|^2 |f_j|^2 - 2 (a_i . a_j)(f_i . f_j)``,
    ``a_i . a_j = [y_i = y_j] - p_i[y_j] - p_j[y_i] + p_i . p_j``: the dot products in float32 (float64 for float64
    input; one pass over the pool per pick), the rest in float64, chunk by chunk, clamped at 0 (near-equal
    embeddings cancel), a running minimum over the picks.

    Deviations from the reference: it L2-normalises the embeddings and then picks deterministically, farthest-first
    in ``1 - cos``, after a first point of "largest norm" that after normalisation is whichever unit row rounds
    highest, an arbitrary point. METHOD.md calls that a deviation from BADGE; here the embeddings keep their
    magnitude (BADGE's uncertainty signal: a confident prediction has a small gradient) and the picks are BADGE's
    ``D^2`` sampling.
    """
    check_matrix("pool_probs", pool_probs)
    check_matrix("pool_features", pool_features)
    check_same_rows("pool_features", pool_features, "pool_probs", pool_probs)
    check_budget(budget, pool_probs.shape[0])
    check_generator(generator)
    check_finite_rows("pool_probs", pool_probs)
    check_finite_rows("pool_features", pool_features)
    n = pool_probs.shape[0]
    if budget == 0:
        return torch.empty(0, dtype=torch.int64)
    rows = default_chunk_rows(pool_probs.shape[1] + pool_features.shape[1])
    y, sq_g = _badge_terms(pool_probs, pool_features, rows)
    min_d2 = torch.full((n,), torch.inf, dtype=torch.float64, device=pool_probs.device)
    picked = torch.zeros(n, dtype=torch.bool, device=pool_probs.device)
    pick = int(sq_g.argmax())
    picks = [pick]
    work = torch.float64 if pool_probs.dtype == torch.float64 else torch.float32
    while len(picks) < budget:
        picked[pick] = True
        pj, fj, yj = pool_probs[pick].to(work), pool_features[pick].to(work), y[pick]
        for start in range(0, n, rows):
            pc, fc = pool_probs[start : start + rows].to(work), pool_features[start : start + rows].to(work)
            yc = y[start : start + rows]
            # Dot products in float64: a near-duplicate of a pick must come out at ~0, not at float32's cancellation.
            aa = (yc == yj).double() - pc[:, yj].double() - pj[yc].double() + pc.double() @ pj.double()
            d2 = (sq_g[start : start + rows] + sq_g[pick] - 2 * aa * (fc.double() @ fj.double())).clamp_min_(0)
            min_d2[start : start + rows] = torch.minimum(min_d2[start : start + rows], d2)
        weights = min_d2.masked_fill(picked, 0)
        if not bool((weights > 0).any()):
            weights = (~picked).double()
        pick = int(torch.multinomial(weights.cpu(), 1, generator=generator))
        picks.append(pick)
    return torch.tensor(picks, dtype=torch.int64)


def _allocation(counts_in_labelled: dict[int, int], present: list[int], budget: int) -> dict[int, int]:
    """Picks per predicted class: ``budget w_c / sum w`` floored, over the classes ``present`` in the pool's
    predictions, ``w_c = 1 / (count_in_L(c) + 1)``; the remainder one each to the highest weights, ties to the lower
    class index. Exact rational arithmetic, so a share that is an integer is never floored to one less."""
    weights = {c: Fraction(1, counts_in_labelled.get(c, 0) + 1) for c in present}
    total = sum(weights.values())
    shares = {c: budget * w / total for c, w in weights.items()}
    allocation = {c: int(s) for c, s in shares.items()}  # int() floors a non-negative Fraction
    remainder = budget - sum(allocation.values())
    for c in sorted(present, key=lambda c: (-weights[c], c))[:remainder]:
        allocation[c] += 1
    return allocation


def class_balanced(
    pool_probs: torch.Tensor, labelled_labels: torch.Tensor, budget: int, *, generator: torch.Generator
) -> torch.Tensor:
    """Class-balanced random picks: more of the predicted classes that the labelled set has fewer of.

    ``pool_probs``: (N, C) float blends, the prediction of a point its argmax (the first maximum);
    ``labelled_labels``: (L,) int64 labels in [0, C) of the labelled set. Class c gets the weight
    ``|L| / (count_in_L(c) + 1)`` (METHOD.md; ``|L|`` cancels in the allocation, so an empty labelled set gives every
    class the same weight, as the reference's uniform fallback does); the budget is split over the predicted classes
    present in the pool in proportion to the weights (floors, then the remainder one each to the highest weights,
    ties to the lower class index). Within each class, in class order, ``torch.randperm`` of its pool points (in
    pool order) picks its share; the shares that classes with too few points cannot take are filled by a random
    permutation of all the points not yet picked (pool order). Picks: class by class, then the fill.

    Deviations from the reference: it gives a class absent from L the count 1 before adding 1 (weight ``|L| / 2``
    instead of ``|L|``), floors shares in floating point (a share of exactly 3 can become 2), and draws from torch's
    and Python's global generators; METHOD.md's formula, exact shares and the caller's generator are used here.
    """
    check_matrix("pool_probs", pool_probs)
    n, c = pool_probs.shape
    if not isinstance(labelled_labels, torch.Tensor) or labelled_labels.dtype != torch.int64:
        got = describe(labelled_labels) if isinstance(labelled_labels, torch.Tensor) else type(labelled_labels).__name__
        raise TypeError(f"labelled_labels must be an int64 tensor of shape (L,), got {got}")
    if labelled_labels.dim() != 1:
        raise ValueError(f"labelled_labels must be an int64 tensor of shape (L,), got {describe(labelled_labels)}")
    if bool(((labelled_labels < 0) | (labelled_labels >= c)).any()):
        raise ValueError(f"labelled_labels must be class indices in [0, {c}) (the columns of pool_probs)")
    check_budget(budget, n)
    check_generator(generator)
    check_finite_rows("pool_probs", pool_probs)
    if budget == 0:
        return torch.empty(0, dtype=torch.int64)

    predicted = pool_probs.argmax(dim=1).cpu()
    present = torch.unique(predicted).tolist()
    counts = Counter(labelled_labels.cpu().tolist())
    allocation = _allocation(counts, present, budget)
    # Each class's pool points in pool order: a stable sort by predicted class, cut at the class sizes.
    by_class = torch.split(torch.sort(predicted, stable=True).indices, torch.bincount(predicted, minlength=c).tolist())
    picks = []
    for cls in present:
        members = by_class[cls]
        order = torch.randperm(members.numel(), generator=generator)
        picks.append(members[order[: allocation[cls]]])
    chosen = torch.cat(picks)
    shortfall = budget - chosen.numel()
    if shortfall:
        rest = torch.ones(n, dtype=torch.bool)
        rest[chosen] = False
        rest = rest.nonzero()[:, 0]
        chosen = torch.cat([chosen, rest[torch.randperm(rest.numel(), generator=generator)[:shortfall]]])
    return chosen
