"""DHO's inference blend and its grid search on every backend, against brute force in float64.

Backends: "reference" (eager PyTorch, the one CPU tensors get), "triton" (CPU tensors under the interpreter, marker
``triton``) and "triton-cuda" (marker ``gpu``). The brute force takes each row's softmax in float64 and the first
maximum written out, pair by pair of the grid; the best pair is METHOD.md's scan (beta outer, alpha inner from the
pure-CE end, as the reference scans its KD weight 1 - alpha upwards, strict >).
"""

import pytest
import torch
from helpers import DTYPES, backend_params, make_inputs

import dho_fast
from dho_fast.ops.blend import DEFAULT_ALPHAS, DEFAULT_BETAS

BLEND_BACKENDS = backend_params("reference", "triton", "triton-cuda")
# Probabilities are at most 1: an absolute tolerance does not grow with the logits. float64 input blends in float64,
# the others in float32 from the same rounded inputs.
PROBABILITY_TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-7)}


def blend_float64(ce: torch.Tensor, kd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha softmax(ce) + (1 - alpha) softmax(kd / beta)`` of each row in float64."""
    return alpha * torch.softmax(ce.double(), dim=1) + (1 - alpha) * torch.softmax(kd.double() / beta, dim=1)


def assert_blend_close(got: torch.Tensor, ce, kd, alpha: float, beta: float, acc: torch.dtype) -> None:
    """``got`` against :func:`blend_float64` within :data:`PROBABILITY_TOLERANCES` and, to first order, what computing
    ``kd / beta`` in ``acc`` changes: each scaled logit is off by ``u |kd / beta|``, which moves a probability
    ``q_c`` by ``q_c (d_c + sum q d)``."""
    want = blend_float64(ce, kd, alpha, beta).cpu()
    q = torch.softmax(kd.double() / beta, dim=1).cpu()
    d = torch.finfo(acc).eps / 2 * (kd.double().cpu() / beta).abs()
    tol = PROBABILITY_TOLERANCES[acc]
    bound = tol["rtol"] * want + tol["atol"] + (1 - alpha) * q * (d + (q * d).sum(dim=1, keepdim=True))
    error = (got.double().cpu() - want).abs()
    ok = error <= bound
    assert bool(ok.all()), f"{int((~ok).sum())} elements off by up to {float((error - bound).max()):.3g} over the bound"


def first_maximum(p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest column index holding the row's maximum."""
    columns = torch.arange(p.shape[1], device=p.device).expand_as(p)
    return torch.where(p == p.max(dim=1, keepdim=True).values, columns, p.shape[1]).min(dim=1).values


def brute_force_counts(ce, kd, labels, alphas, betas, near: float):
    """(A, B) float64 counts of correct first-maximum predictions, and of the rows whose prediction a rounding of the
    blend could change: another column within ``near`` of the maximum whose (ce, kd) logits differ from its (equal
    logits give equal blends in any precision, so those ties are exact)."""
    counts = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    ambiguous = torch.zeros_like(counts)
    rows = torch.arange(len(labels))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            p = blend_float64(ce, kd, a, b)
            pred = first_maximum(p)
            counts[i, j] = float((pred == labels).sum())
            same = (ce == ce[rows, pred][:, None]) & (kd == kd[rows, pred][:, None])
            close = (p >= p[rows, pred][:, None] - near) & ~same
            ambiguous[i, j] = float(close.any(dim=1).sum())
    return counts, ambiguous


def methods_best(table: torch.Tensor, alphas, betas) -> tuple[float, float, float]:
    """(alpha, beta, accuracy) of the reference protocol: beta outer, alpha inner from the last alpha to the first
    (the reference's KD weight 1 - alpha upwards), strictly better replaces."""
    best = (-1.0, None, None)
    for j, b in enumerate(betas):
        for i in reversed(range(len(alphas))):
            if table[i, j] > best[0]:
                best = (float(table[i, j]), alphas[i], b)
    return best[1], best[2], best[0]


def test_default_grid_is_methods():
    assert DEFAULT_ALPHAS == tuple(i / 20 for i in range(21))
    assert DEFAULT_BETAS == (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


@pytest.mark.parametrize("backend_device", BLEND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 7, 997, 5000])
@pytest.mark.parametrize("scale", [3.0, 1e4], ids=["plain", "1e4"])
def test_predict(backend_device, dtype, c, scale):
    backend, device = backend_device
    scale = min(scale, 3e3) if dtype == torch.float16 else scale  # fp16 cannot hold 1e4 * randn
    ce, kd, _, _ = make_inputs(9, c, dtype, scale=scale, device=device)
    with torch.no_grad():
        got = dho_fast.dual_head_predict(ce, kd, 0.3, 1.5, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc and got.shape == ce.shape
    assert_blend_close(got, ce, kd, 0.3, 1.5, acc)


@pytest.mark.parametrize("backend_device", backend_params("triton"))
@pytest.mark.parametrize("c", [65, 997])
def test_triton_predict_rows_wider_than_a_tile(backend_device, c, monkeypatch):
    # Rows wider than MAX_TILE are read twice; a small tile runs that path on small inputs.
    from dho_fast.kernels import dual_head_loss as triton_loss

    backend, device = backend_device
    monkeypatch.setattr(triton_loss, "MAX_TILE", 64)
    ce, kd, _, _ = make_inputs(9, c, device=device)
    got = dho_fast.dual_head_predict(ce, kd, 0.6, 0.75, backend=backend)
    assert_blend_close(got, ce, kd, 0.6, 0.75, torch.float32)


def test_predict_gradient_through_the_reference_blend():
    # With a graph wanted, "auto" gives the differentiable eager blend: its gradient is float64 autograd's.
    ce, kd = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    weights = torch.randn(5, 7)
    (dho_fast.dual_head_predict(ce, kd, 0.3, 1.5) * weights).sum().backward()
    ce64, kd64 = (t.detach().double().requires_grad_() for t in (ce, kd))
    want = torch.autograd.grad((blend_float64(ce64, kd64, 0.3, 1.5) * weights.double()).sum(), (ce64, kd64))
    torch.testing.assert_close((ce.grad.double(), kd.grad.double()), want, rtol=1e-5, atol=1e-7)


def coarse_logits(n, c, device, dtype=torch.float32):
    """Integer logits in [-3, 3]: equal logits (exact ties of the blend) are common."""
    return [torch.randint(-3, 4, (n, c)).to(device, dtype) for _ in range(2)]


# (logits, dtype, N, C); the interpreter takes seconds per case.
SEARCH_CASES = [
    ("coarse", torch.float32, 1, 1),
    ("coarse", torch.float32, 37, 10),
    ("coarse", torch.float64, 24, 101),
    ("coarse", torch.bfloat16, 12, 997),
    ("normal", torch.float32, 12, 997),
    ("normal", torch.float64, 37, 10),
    ("normal", torch.bfloat16, 24, 101),
]


@pytest.mark.parametrize("backend_device", BLEND_BACKENDS)
@pytest.mark.parametrize("logits, dtype, n, c", SEARCH_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_search(backend_device, logits, dtype, n, c):
    backend, device = backend_device
    if logits == "coarse":
        ce, kd = coarse_logits(n, c, device, dtype)
    else:
        ce, kd, _, _ = make_inputs(n, c, dtype, device=device)
    labels = torch.randint(0, c, (n,), device=device)
    result = dho_fast.search_alpha_beta(ce, kd, labels, backend=backend)
    # Blends in float32 (float64 for float64 input) may order columns closer than this differently from float64's.
    near = 1e-12 if dtype == torch.float64 else 1e-6
    counts, ambiguous = brute_force_counts(ce.cpu(), kd.cpu(), labels.cpu(), DEFAULT_ALPHAS, DEFAULT_BETAS, near)
    assert result.table.shape == (21, 7) and result.table.dtype == torch.float64
    off = (result.table * n - counts).abs()
    assert bool((off <= ambiguous).all()), f"counts off by {off.max()} where {ambiguous.max()} rows are near ties"
    assert (result.alpha, result.beta, result.accuracy) == methods_best(result.table, DEFAULT_ALPHAS, DEFAULT_BETAS)
    assert (result.alphas, result.betas) == (DEFAULT_ALPHAS, DEFAULT_BETAS)


@pytest.mark.parametrize("backend_device", BLEND_BACKENDS)
def test_search_breaks_ties_as_the_reference_protocol(backend_device):
    # One row whose table is [[0, 1], [1, 1]]: scanning alpha-major would pick (0.25, 2.0), the reference's
    # beta-major scan (METHOD.md) picks (0.75, 0.5).
    backend, device = backend_device
    ce = torch.tensor([[2.0, -1.0, 0.0]], device=device)
    kd = torch.tensor([[-2.0, -2.0, -1.0]], device=device)
    labels = torch.tensor([0], device=device)
    alphas, betas = [0.25, 0.75], [0.5, 2.0]
    counts, ambiguous = brute_force_counts(ce.cpu(), kd.cpu(), labels.cpu(), alphas, betas, 1e-6)
    assert counts.tolist() == [[0.0, 1.0], [1.0, 1.0]] and not ambiguous.any()
    result = dho_fast.search_alpha_beta(ce, kd, labels, alphas, betas, backend=backend)
    assert result.table.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert (result.alpha, result.beta, result.accuracy) == (0.75, 0.5, 1.0)


@pytest.mark.parametrize("backend_device", BLEND_BACKENDS)
def test_search_ties_go_to_the_pure_ce_end_as_in_the_reference(backend_device):
    # Equal heads give every pair of the grid the same predictions. The reference blends (1 - a) ce + a kd and scans
    # a = 0, 0.05, ... upwards, keeping its first pair: a = 0, the pure-CE blend, which is alpha = 1 here.
    backend, device = backend_device
    ce = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, -1.0]], device=device)
    labels = torch.tensor([0, 1], device=device)
    result = dho_fast.search_alpha_beta(ce, ce.clone(), labels, backend=backend)
    assert bool((result.table == 1).all())
    assert (result.alpha, result.beta) == (1.0, 0.5)


@pytest.mark.parametrize("backend_device", BLEND_BACKENDS)
def test_search_custom_grid(backend_device):
    backend, device = backend_device
    ce, kd, _, labels = make_inputs(20, 4, labelled="all", device=device)
    result = dho_fast.search_alpha_beta(ce, kd, labels, alphas=[0.0, 1.0], betas=[1.0], backend=backend)
    assert result.table.shape == (2, 1)
    # alpha = 1 is the CE head alone, alpha = 0 the KD head alone.
    assert result.table[1, 0] == float((first_maximum(ce) == labels).double().mean())
    assert result.table[0, 0] == float((first_maximum(kd) == labels).double().mean())


def test_reference_search_reads_large_sets_in_chunks(monkeypatch):
    monkeypatch.setattr(dho_fast.ops.reference, "ELEMENTS_PER_CHUNK", 21 * 7 * 13 * 3)  # 3 rows per chunk
    ce, kd = coarse_logits(40, 13, "cpu")
    labels = torch.randint(0, 13, (40,))
    result = dho_fast.search_alpha_beta(ce, kd, labels, backend="reference")
    counts, ambiguous = brute_force_counts(ce, kd, labels, DEFAULT_ALPHAS, DEFAULT_BETAS, 1e-6)
    assert bool(((result.table * 40 - counts).abs() <= ambiguous).all())
