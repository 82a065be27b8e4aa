"""Values and gradients of the compiled CPU backend against the reference."""

import os

import pytest
import torch
from helpers import IGNORE, assert_backend_matches_reference, make_inputs, run_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import dho_fast
from dho_fast import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 7), (5, 1), (17, 997), (64, 1000), (8, 21843)]
KW = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5)


def fused(*args, **kwargs):
    return dho_fast.fused_dual_head_loss(*args, return_terms=True, backend="cpu", **kwargs)


def assert_matches_reference(inputs, dtype, **kwargs):
    assert_backend_matches_reference("cpu", inputs, dtype, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
def test_matches_reference(shape, dtype, labelled):
    assert_matches_reference(make_inputs(*shape, dtype, labelled=labelled), dtype, **KW)


@pytest.mark.parametrize("kd_reduction", ["split", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_options_match_reference(kd_reduction, label_smoothing):
    kwargs = dict(temperature=4.0, ce_loss_weight=1.0, kd_loss_weight=0.3, kd_reduction=kd_reduction)
    inputs = make_inputs(40, 333, labelled="mixed")
    assert_matches_reference(inputs, torch.float32, label_smoothing=label_smoothing, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_and_masked_teacher(dtype):
    # Spreads of 1e4 overflow a naive exp; -inf teacher entries are masked classes.
    scale = 1e4 if dtype != torch.float16 else 3e3  # fp16 cannot hold 1e4 * randn
    inputs = make_inputs(32, 513, dtype, scale=scale, masked_fraction=0.5)
    assert_matches_reference(inputs, dtype, **KW)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_instruction_set_variant(capability, monkeypatch):
    # The kernel is compiled per instruction set and chosen at run time; each build must agree with the reference.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_reference(make_inputs(9, 1037, dtype, masked_fraction=0.2), dtype, **KW)


def test_no_labelled_rows_gives_zero_ce_term_and_gradient():
    ce, kd, teacher, labels = make_inputs(6, 10, labelled="none")
    loss, ce_term, kd_term, g_ce, _ = run_backend("cpu", ce, kd, teacher, labels, **KW)
    assert ce_term.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(g_ce) == 0


def test_identical_distributions_give_zero_kd():
    ce, kd, _, labels = make_inputs(8, 50, labelled="none")
    loss, _, kd_term, _, g_kd = run_backend("cpu", ce, kd, kd.clone(), labels, **KW)
    assert abs(kd_term.item()) < 1e-5
    assert g_kd.abs().max() < 1e-6


def test_unlabelled_rows_get_no_ce_gradient():
    ce, kd, teacher, labels = make_inputs(10, 20, labelled="mixed")
    labels[0], labels[1] = IGNORE, 3
    *_, g_ce, _ = run_backend("cpu", ce, kd, teacher, labels, **KW)
    assert torch.count_nonzero(g_ce[labels == IGNORE]) == 0
    assert torch.count_nonzero(g_ce[1]) > 0


def test_gradient_of_logged_terms():
    # ce_term and kd_term are differentiable outputs too: their gradients must match the reference's.
    ce, kd, teacher, labels = make_inputs(12, 30)
    for fn in (fused, reference.dual_head_loss):
        a, b = ce.clone().requires_grad_(), kd.clone().requires_grad_()
        loss, ce_term, kd_term = fn(a, b, teacher, labels, **KW)
        (2.0 * loss + 3.0 * ce_term - kd_term).backward()
        if fn is fused:
            got = (a.grad, b.grad)
        else:
            torch.testing.assert_close(got, (a.grad, b.grad), rtol=1e-5, atol=1e-6)


def test_only_the_needed_gradient_is_computed():
    ce, kd, teacher, labels = make_inputs(4, 9)
    kd.requires_grad_()
    dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="cpu").backward()
    assert kd.grad is not None and ce.grad is None


def test_gradcheck_float64():
    ce, kd, teacher, labels = make_inputs(6, 11, torch.float64, masked_fraction=0.2)
    ce.requires_grad_()
    kd.requires_grad_()

    def loss(a, b):
        return dho_fast.fused_dual_head_loss(a, b, teacher, labels, backend="cpu", label_smoothing=0.1, **KW)

    assert torch.autograd.gradcheck(loss, (ce, kd))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(requires_grad):
    ce, kd, teacher, labels = make_inputs(7, 13)
    ce.requires_grad_(requires_grad)
    kd.requires_grad_(requires_grad)
    args = (ce, kd, teacher, labels, 2.0, 0.5, 0.5, True, IGNORE, 0.0, requires_grad, requires_grad)
    torch.library.opcheck(torch.ops.dho_fast.dual_head_loss.default, args)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("DHO_FAST_BACKEND", "reference")
    inputs = make_inputs(3, 4)
    assert dho_fast.ops.backends.resolve("dual_head_loss", None, inputs[0].device) == "reference"
    monkeypatch.setenv("DHO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        dho_fast.fused_dual_head_loss(*inputs)


def test_result_does_not_depend_on_thread_count():
    inputs = make_inputs(256, 700)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_backend("cpu", *inputs, **KW)
        torch.set_num_threads(max(2, os.cpu_count() or 2))
        many = run_backend("cpu", *inputs, **KW)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    c=st.integers(1, 600),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    temperature=st.floats(0.25, 8.0),
    masked=st.sampled_from([0.0, 0.3, 0.9]),
    labelled=st.sampled_from(["all", "none", "mixed"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(n, c, scale, temperature, masked, labelled, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = make_inputs(n, c, scale=scale, masked_fraction=masked, labelled=labelled, generator=g)
    got = run_backend("cpu", *inputs, temperature=temperature)
    want = run_backend("reference", *inputs, temperature=temperature)
    # Relative to the size of the loss: at logit spreads of 1e4 the terms are ~1e4 and float32 rounds at ~1e-3.
    for g_, w in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_gradient_element_is_written(labelled, dtype, monkeypatch):
    monkeypatch.setenv("DHO_FAST_POISON_OUTPUTS", "1")
    *_, g_ce, g_kd = run_backend("cpu", *make_inputs(13, 1031, dtype, labelled=labelled), **KW)
    assert torch.isfinite(g_ce).all() and torch.isfinite(g_kd).all()
