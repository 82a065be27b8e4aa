"""The baselines (random, entropy, BADGE, class-balanced) and select() on small hand-checkable cases, against
independent computations (float64 entropies with 0 log 0 = 0 written out, BADGE's embeddings materialised, exact
class shares), and their properties: distinct indices in range, reproducible from the seed, the sampling
distributions over many seeds."""

import math

import pytest
import torch

from dho_fast.select import (
    STRATEGIES,
    PoolOutputs,
    badge,
    class_balanced,
    coreset,
    entropy,
    pcoreset,
    random,
    select,
)
from dho_fast.select import checks as select_checks
from dho_fast.select.baselines import _allocation

pytestmark = pytest.mark.filterwarnings("ignore:dho_fast. kcenter_update has no compiled kernel")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_valid(picks: torch.Tensor, pool_size: int, budget: int) -> None:
    assert picks.dtype == torch.int64 and picks.shape == (budget,) and picks.device.type == "cpu"
    assert len(set(picks.tolist())) == budget
    assert all(0 <= i < pool_size for i in picks.tolist())


def frequencies(draws: list[int], size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(draws), minlength=size).double() / len(draws)


# --- random -----------------------------------------------------------------------------------------------------------


def test_random_is_a_reproducible_uniform_draw():
    assert_valid(random(10, 4, generator=gen(0)), 10, 4)
    assert torch.equal(random(10, 4, generator=gen(3)), random(10, 4, generator=gen(3)))
    assert sorted(random(7, 7, generator=gen(1)).tolist()) == list(range(7))
    assert random(7, 0, generator=gen(1)).shape == (0,)
    # Each of 5 points is in a draw of 2 with probability 2/5 (4000 draws: standard error 0.008).
    draws = [i for seed in range(4000) for i in random(5, 2, generator=gen(seed)).tolist()]
    torch.testing.assert_close(frequencies(draws, 5) * 2, torch.full((5,), 0.4, dtype=torch.float64), atol=0.04, rtol=0)


# --- entropy ----------------------------------------------------------------------------------------------------------


def entropy_float64(p: torch.Tensor) -> list[float]:
    return [-sum(x * math.log(x) for x in row if x > 0) for row in p.double().tolist()]


def test_entropy_orders_by_entropy_with_ties_to_the_lowest_index():
    p = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # 0: H = 0, and 0 log 0 = 0 (no NaN)
            [0.5, 0.5, 0.0, 0.0],  # 1: log 2
            [0.25, 0.25, 0.25, 0.25],  # 2: log 4
            [0.0, 0.0, 0.5, 0.5],  # 3: log 2, tied with row 1
            [0.25, 0.25, 0.25, 0.25],  # 4: log 4, tied with row 2
            [0.9, 0.1, 0.0, 0.0],  # 5: between 0 and log 2
        ]
    )
    h = entropy_float64(p)
    assert 0 < h[5] < h[1] < h[2]
    assert entropy(p, 6).tolist() == [2, 4, 1, 3, 5, 0]
    assert entropy(p, 3).tolist() == [2, 4, 1]
    assert entropy(p, 0).shape == (0,)


def test_entropy_matches_float64_on_random_blends():
    p = torch.softmax(torch.randn(300, 12) * 4, dim=1)
    p[::7, 3] = 0.0  # exact zeros in some rows
    h = torch.tensor(entropy_float64(p))
    picks = entropy(p, 50)
    assert_valid(picks, 300, 50)
    # Each pick's entropy is the largest of those not picked before it, to float64 rounding.
    chosen = h[picks]
    assert bool((chosen[:-1] >= chosen[1:]).all())
    rest = torch.ones(300, dtype=torch.bool)
    rest[picks] = False
    assert float(chosen.min()) >= float(h[rest].max()) - 1e-12


def test_entropy_rejects_values_that_are_not_probabilities():
    p = torch.full((4, 3), 1 / 3)
    p[2, 1] = -0.1
    with pytest.raises(ValueError, match="pool_probs row 2"):
        entropy(p, 1)
    p[2, 1] = float("nan")
    with pytest.raises(ValueError, match="pool_probs row 2"):
        entropy(p, 1)


# --- BADGE ------------------------------------------------------------------------------------------------------------


def badge_embeddings(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(N, C D) float64 gradient embeddings ``(onehot(argmax p) - p) (x) f``, materialised."""
    p, f = p.double(), f.double()
    a = torch.nn.functional.one_hot(p.argmax(dim=1), p.shape[1]).double() - p
    return (a[:, :, None] * f[:, None, :]).flatten(1)


def sq_dist_to(g: torch.Tensor, centres: list[int]) -> torch.Tensor:
    return torch.stack([(g - g[c]).square().sum(dim=1) for c in centres]).min(dim=0).values


def test_badge_samples_d2_as_k_means_plus_plus():
    p = torch.softmax(torch.randn(5, 3) * 2, dim=1)
    f = torch.randn(5, 4)
    first = int(badge_embeddings(p, f).norm(dim=1).argmax())
    # Row 5 duplicates the first pick: at squared distance 0 from it, it must never be drawn, however far it is from
    # the second pick (only the running minimum over all picks keeps it at 0).
    p, f = torch.cat([p, p[first : first + 1]]), torch.cat([f, f[first : first + 1]])
    g = badge_embeddings(p, f)
    draws = [badge(p, f, 3, generator=gen(seed)).tolist() for seed in range(3000)]
    assert all(d[0] == first for d in draws)
    # Second pick: probability proportional to the squared distance to the first (standard error <= 0.009).
    second = sq_dist_to(g, [first]) / sq_dist_to(g, [first]).sum()
    torch.testing.assert_close(frequencies([d[1] for d in draws], 6), second, atol=0.04, rtol=0)
    # Third pick: given the second s, proportional to the smaller squared distance to the first or s; over all draws,
    # that mixture weighted by the second pick's probabilities.
    mixture = sum(second[s] * sq_dist_to(g, [first, s]) / sq_dist_to(g, [first, s]).sum() for s in range(6))
    torch.testing.assert_close(frequencies([d[2] for d in draws], 6), mixture, atol=0.04, rtol=0)
    assert all(5 not in d for d in draws)


def test_badge_chunks_change_nothing(monkeypatch):
    p = torch.softmax(torch.randn(9, 3, dtype=torch.float64) * 2, dim=1)
    f = torch.randn(9, 4, dtype=torch.float64)
    whole = [badge(p, f, 6, generator=gen(seed)) for seed in range(20)]
    monkeypatch.setattr(select_checks, "CHECK_ELEMENTS", 14)  # the loops read 2 rows of C + D = 7 at a time
    for seed, want in enumerate(whole):
        assert torch.equal(badge(p, f, 6, generator=gen(seed)), want)


def test_badge_properties():
    p = torch.softmax(torch.randn(40, 6) * 3, dim=1)
    f = torch.randn(40, 5)
    picks = badge(p, f, 40, generator=gen(7))
    assert_valid(picks, 40, 40)
    assert torch.equal(picks, badge(p, f, 40, generator=gen(7)))
    assert badge(p, f, 0, generator=gen(7)).shape == (0,)
    # One-hot predictions have zero gradient embeddings: the first pick is row 0, then uniform draws.
    onehot = torch.eye(4)[torch.randint(0, 4, (6,))]
    draws = [badge(onehot, f[:6], 2, generator=gen(seed)).tolist() for seed in range(2000)]
    assert all(d[0] == 0 for d in draws)
    want = torch.tensor([0.0] + [0.2] * 5, dtype=torch.float64)
    torch.testing.assert_close(frequencies([d[1] for d in draws], 6), want, atol=0.04, rtol=0)


def test_badge_argument_errors():
    p, f = torch.rand(5, 3), torch.rand(5, 2)
    with pytest.raises(ValueError, match="pool_features must have the 5 rows of pool_probs"):
        badge(p, f[:4], 2, generator=gen(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        badge(p, f, 2, generator=0)
    with pytest.raises(ValueError, match="pool_features row 1"):
        badge(p, torch.tensor([[0.0, 0], [float("inf"), 0], [0, 0], [0, 0], [0, 0]]), 2, generator=gen(0))


# --- class-balanced ---------------------------------------------------------------------------------------------------


def test_allocation_by_exact_shares():
    # Weights 1/4, 1/2, 1 (counts 3, 1, 0) of 7/4: budget 7 splits exactly 1, 2, 4.
    assert _allocation({0: 3, 1: 1}, [0, 1, 2], 7) == {0: 1, 1: 2, 2: 4}
    # Weights 1/3, 1, 1: shares 4/7, 12/7, 12/7 floor to 0, 1, 1; the remainder 2 goes to the two weights of 1.
    assert _allocation({0: 2}, [0, 1, 2], 4) == {0: 0, 1: 2, 2: 2}
    # Equal weights: the remainder to the lower class indices.
    assert _allocation({}, [0, 2, 5], 5) == {0: 2, 2: 2, 5: 1}
    # A class of L that the pool never predicts takes no share.
    assert _allocation({0: 1, 1: 9}, [1], 3) == {1: 3}
    # Floors with a remainder that skips ties: weights 1/2, 1/2, 1/3 (counts 1, 1, 2) of 4/3, budget 10:
    # shares 3.75, 3.75, 2.5 floor to 3, 3, 2; remainder 2 to classes 0 and 1.
    assert _allocation({0: 1, 1: 1, 2: 2}, [0, 1, 2], 10) == {0: 4, 1: 4, 2: 2}


def one_hot_probs(predicted: list[int], num_classes: int) -> torch.Tensor:
    """Blends whose argmax is ``predicted``."""
    p = torch.full((len(predicted), num_classes), 0.1 / num_classes)
    p[torch.arange(len(predicted)), torch.tensor(predicted)] += 0.9
    return p


def test_class_balanced_picks_each_class_share_then_fills():
    predicted = [0, 2, 2, 0, 1, 2, 0, 2, 0, 2, 0, 2]  # class 0: 5 points, class 1: 1, class 2: 6
    members = {c: [i for i, y in enumerate(predicted) if y == c] for c in range(3)}
    p = one_hot_probs(predicted, 4)
    labels = torch.tensor([0, 0, 0, 1])  # counts 3, 1, 0 (class 3: none, and never predicted)
    # Weights 1/4, 1/2, 1 over the predicted classes 0, 1, 2: budget 7 -> 1, 2, 4; class 1 has one point: 1 to fill.
    picks = class_balanced(p, labels, 7, generator=gen(0))
    assert_valid(picks, 12, 7)
    first, second, third, fill = picks[:1].tolist(), picks[1:2].tolist(), picks[2:6].tolist(), picks[6:].tolist()
    assert set(first) <= set(members[0]) and second == members[1] and set(third) <= set(members[2])
    assert fill[0] not in picks[:6].tolist()
    # Random within a class: each of class 2's six points is among its four picks with probability 2/3 (standard error
    # 0.012).
    draws = [i for seed in range(1500) for i in class_balanced(p, labels, 7, generator=gen(seed))[2:6].tolist()]
    got = frequencies(draws, 12)[members[2]] * 4
    torch.testing.assert_close(got, torch.full((6,), 2 / 3, dtype=torch.float64), atol=0.06, rtol=0)
    assert torch.equal(class_balanced(p, labels, 7, generator=gen(5)), class_balanced(p, labels, 7, generator=gen(5)))


def test_class_balanced_with_an_empty_labelled_set_and_the_whole_pool():
    predicted = [1, 1, 0, 0, 0, 3]
    p = one_hot_probs(predicted, 4)
    picks = class_balanced(p, torch.zeros(0, dtype=torch.int64), 3, generator=gen(1))
    # Equal weights over the predicted classes 0, 1, 3: one each, in class order.
    assert [predicted[i] for i in picks.tolist()] == [0, 1, 3]
    assert sorted(class_balanced(p, torch.tensor([2]), 6, generator=gen(2)).tolist()) == list(range(6))
    assert class_balanced(p, torch.tensor([2]), 0, generator=gen(2)).shape == (0,)


def test_class_balanced_argument_errors():
    p = one_hot_probs([0, 1, 1], 3)
    with pytest.raises(TypeError, match="labelled_labels must be an int64 tensor"):
        class_balanced(p, torch.tensor([0.0]), 1, generator=gen(0))
    with pytest.raises(ValueError, match="labelled_labels must be class indices in \\[0, 3\\)"):
        class_balanced(p, torch.tensor([3]), 1, generator=gen(0))
    with pytest.raises(ValueError, match="budget must be"):
        class_balanced(p, torch.tensor([0]), 4, generator=gen(0))


# --- select -----------------------------------------------------------------------------------------------------------


def outputs(n: int, c: int = 5, d: int = 6) -> PoolOutputs:
    return PoolOutputs(torch.randn(n, c) * 2, torch.randn(n, c) * 2, torch.randn(n, d))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_select_every_strategy(strategy):
    pool, labelled = outputs(30), outputs(4)
    labels = torch.tensor([0, 1, 1, 4])
    picks = select(strategy, pool, labelled, labels, 8, seed=11)
    assert_valid(picks, 30, 8)
    assert torch.equal(picks, select(strategy, pool, labelled, labels, 8, seed=11))
    assert select(strategy, pool, labelled, labels, 0, seed=11).shape == (0,)
    with pytest.raises(ValueError, match="budget must be"):
        select(strategy, pool, labelled, labels, 31, seed=11)


def test_select_passes_each_strategy_its_inputs():
    pool, labelled = outputs(25), outputs(3)
    labels = torch.tensor([2, 2, 0])
    assert torch.equal(
        select("pcoreset", pool, labelled, labels, 6, seed=0), pcoreset(pool.probs(), labelled.probs(), 6)
    )
    assert torch.equal(
        select("coreset", pool, labelled, labels, 6, seed=0), coreset(pool.features, labelled.features, 6)
    )
    assert torch.equal(select("entropy", pool, labelled, labels, 6, seed=0), entropy(pool.probs(), 6))
    assert torch.equal(select("random", pool, labelled, labels, 6, seed=4), random(25, 6, generator=gen(4)))
    want = badge(pool.probs(), pool.features, 6, generator=gen(4))
    assert torch.equal(select("badge", pool, labelled, labels, 6, seed=4), want)
    want = class_balanced(pool.probs(), labels, 6, generator=gen(4))
    assert torch.equal(select("class_balanced", pool, labelled, labels, 6, seed=4), want)


def test_select_argument_errors():
    pool, labelled = outputs(10), outputs(2)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="strategy must be one of"):
        select("kcenter", pool, labelled, labels, 2, seed=0)
    with pytest.raises(TypeError, match="pool must be a PoolOutputs"):
        select("random", pool.probs(), labelled, labels, 2, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        select("random", pool, labelled, labels, 2, seed=1.5)
    with pytest.raises(TypeError, match="budget must be an int"):
        select("entropy", pool, labelled, labels, 2.0, seed=0)
