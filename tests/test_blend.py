"""The dual-head inference blend and its grid search."""

import pytest
import torch

import dho_fast
from dho_fast import reference
from dho_fast.ops.blend import DEFAULT_ALPHAS, DEFAULT_BETAS


def test_default_grid_is_methods():
    assert len(DEFAULT_ALPHAS) == 21 and DEFAULT_ALPHAS[0] == 0.0 and DEFAULT_ALPHAS[-1] == 1.0
    assert DEFAULT_BETAS == (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def test_predict_matches_formula():
    ce, kd = torch.randn(5, 7), torch.randn(5, 7)
    p = dho_fast.dual_head_predict(ce, kd, 0.3, 1.5)
    torch.testing.assert_close(p, reference.dual_head_predict(ce, kd, 0.3, 1.5))
    torch.testing.assert_close(p.sum(1), torch.ones(5))


@pytest.mark.parametrize("n, c", [(1, 1), (37, 10), (300, 101)])
def test_search_equals_brute_force(n, c):
    # Logits on a coarse grid make ties common, so the tie-breaking rule is exercised too.
    ce = torch.randint(-3, 4, (n, c)).float()
    kd = torch.randint(-3, 4, (n, c)).float()
    labels = torch.randint(0, c, (n,))
    result = dho_fast.search_alpha_beta(ce, kd, labels)
    best = (-1.0, None, None)
    for i, a in enumerate(DEFAULT_ALPHAS):
        for j, b in enumerate(DEFAULT_BETAS):
            acc = (dho_fast.dual_head_predict(ce, kd, a, b).argmax(1) == labels).double().mean().item()
            assert result.table[i, j].item() == pytest.approx(acc, abs=1e-12)
            if acc > best[0]:
                best = (acc, a, b)
    assert (result.accuracy, result.alpha, result.beta) == best


def test_search_reads_large_sets_in_chunks(monkeypatch):
    monkeypatch.setattr(dho_fast.ops.reference, "BLEND_ELEMENTS_PER_CHUNK", 21 * 7 * 13 * 3)  # 3 rows per chunk
    ce, kd = torch.randn(40, 13), torch.randn(40, 13)
    labels = torch.randint(0, 13, (40,))
    chunked = dho_fast.search_alpha_beta(ce, kd, labels)
    monkeypatch.undo()
    whole = dho_fast.search_alpha_beta(ce, kd, labels)
    assert torch.equal(chunked.table, whole.table)


def test_search_custom_grid():
    ce, kd = torch.randn(20, 4), torch.randn(20, 4)
    labels = torch.randint(0, 4, (20,))
    result = dho_fast.search_alpha_beta(ce, kd, labels, alphas=[0.0, 1.0], betas=[1.0])
    assert result.table.shape == (2, 1)
    assert result.table[1, 0] == (ce.argmax(1) == labels).double().mean()
    assert result.table[0, 0] == (kd.argmax(1) == labels).double().mean()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(alphas=[1.5]), "alphas"),
        (dict(betas=[0.0]), "betas"),
        (dict(alphas=[]), "alphas"),
    ],
)
def test_search_bad_grid(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dho_fast.search_alpha_beta(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), **kwargs)


def test_bad_inputs_name_the_argument():
    ce = torch.randn(3, 4)
    with pytest.raises(ValueError, match="kd_logits"):
        dho_fast.dual_head_predict(ce, torch.randn(3, 5), 0.5, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        dho_fast.dual_head_predict(ce, ce, 1.5, 1.0)
    with pytest.raises(ValueError, match="beta"):
        dho_fast.dual_head_predict(ce, ce, 0.5, 0.0)
    with pytest.raises(ValueError, match="labels"):
        dho_fast.search_alpha_beta(ce, ce, torch.tensor([0, 1, 4]))
