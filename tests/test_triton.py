"""The Triton kernels (kernels/) against the reference, with the CPU backend's cases.

Runs in its own pytest invocation, on the CPU under the Triton interpreter (where a GPU exists, drop the variable
and the same tests run on CUDA tensors):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -m triton tests/
"""

import pytest
import torch
from helpers import IGNORE, TOLERANCES, assert_backend_matches_reference, make_inputs, run_backend

import dho_fast
from dho_fast import kernels
from dho_fast.ops import blend

RUNNABLE = kernels.has_triton() and (kernels.interpreted() or torch.cuda.is_available())
DEVICE = "cpu" if kernels.interpreted() or not torch.cuda.is_available() else "cuda"

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not RUNNABLE, reason="needs Triton and TRITON_INTERPRET=1 or a GPU"),
    # The interpreter evaluates both sides of tl.where with numpy, which warns about the discarded side's inf/NaN.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

if RUNNABLE:
    from dho_fast.kernels import dual_head_loss as triton_loss

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 7), (5, 1), (17, 997), (16, 1000), (3, 21843)]
# Temperatures and weights exact in float32, the precision of the kernels' scalar arguments (float64 inputs).
KW = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5)


def inputs(*args, **kwargs):
    return make_inputs(*args, device=DEVICE, **kwargs)


def matches(inputs_, dtype, **kwargs):
    assert_backend_matches_reference("triton", inputs_, dtype, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
def test_matches_reference(shape, dtype, labelled):
    matches(inputs(*shape, dtype, labelled=labelled), dtype, **KW)


@pytest.mark.parametrize("kd_reduction", ["split", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_options_match_reference(kd_reduction, label_smoothing):
    kwargs = dict(temperature=4.0, ce_loss_weight=1.0, kd_loss_weight=0.3, kd_reduction=kd_reduction)
    matches(inputs(40, 333, labelled="mixed"), torch.float32, label_smoothing=label_smoothing, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_and_masked_teacher(dtype):
    scale = 1e4 if dtype != torch.float16 else 3e3  # fp16 cannot hold 1e4 * randn
    matches(inputs(32, 513, dtype, scale=scale, masked_fraction=0.5), dtype, **KW)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
def test_rows_wider_than_a_tile(dtype, labelled, monkeypatch):
    # Rows wider than MAX_TILE take the two-pass path; a small tile runs it on small, fast inputs.
    monkeypatch.setattr(triton_loss, "MAX_TILE", 64)
    for c in (65, 997):
        matches(inputs(9, c, dtype, labelled=labelled, masked_fraction=0.3), dtype, label_smoothing=0.1, **KW)


def test_adversarial_rows():
    ce, kd, teacher, labels = inputs(4, 300, labelled="all")
    teacher[0] = float("-inf")
    teacher[0, 123] = 2.5  # all -inf but one: the teacher is one-hot
    ce[1], kd[1], teacher[1] = 7.25, 7.25, 7.25  # all equal
    ce[2, :2], kd[2, 2:4], teacher[2, 4:6] = torch.tensor([1e4, -1e4]), torch.tensor([1e4, -1e4]), 1e4
    matches((ce, kd, teacher, labels), torch.float32, label_smoothing=0.2, **KW)


def test_no_labelled_rows_gives_zero_ce_term_and_gradient():
    loss, ce_term, _, g_ce, _ = run_backend("triton", *inputs(6, 10, labelled="none"), **KW)
    assert ce_term.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(g_ce) == 0


def test_only_the_needed_gradient_is_computed():
    ce, kd, teacher, labels = inputs(4, 9)
    kd.requires_grad_()
    dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="triton").backward()
    assert kd.grad is not None and ce.grad is None


def test_gradient_of_logged_terms():
    ce, kd, teacher, labels = inputs(12, 30)
    grads = []
    for backend in ("triton", "reference"):
        a, b = ce.clone().requires_grad_(), kd.clone().requires_grad_()
        loss, ce_term, kd_term = dho_fast.fused_dual_head_loss(
            a, b, teacher, labels, return_terms=True, backend=backend, **KW
        )
        (2.0 * loss + 3.0 * ce_term - kd_term).backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    ce, kd, teacher, labels = inputs(5, 9, torch.float64, masked_fraction=0.2)

    def loss(a, b):
        return dho_fast.fused_dual_head_loss(a, b, teacher, labels, backend="triton", label_smoothing=0.25, **KW)

    # fast_mode: random projections instead of every input element; the interpreter is slow.
    assert torch.autograd.gradcheck(loss, (ce.requires_grad_(), kd.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
def test_every_gradient_element_is_written(labelled, monkeypatch):
    monkeypatch.setenv("DHO_FAST_POISON_OUTPUTS", "1")
    *_, g_ce, g_kd = run_backend("triton", *inputs(13, 1031, torch.bfloat16, labelled=labelled), **KW)
    assert torch.isfinite(g_ce).all() and torch.isfinite(g_kd).all()


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(requires_grad):
    ce, kd, teacher, labels = inputs(7, 13)
    args = (ce.requires_grad_(requires_grad), kd.requires_grad_(requires_grad), teacher, labels)
    args += (2.0, 0.5, 0.5, True, IGNORE, 0.0, requires_grad, requires_grad)
    # The interpreter cannot run on fake tensors: the fake/compile checks run on a GPU and in test_triton_trace.py.
    utils = ("test_schema", "test_autograd_registration") if kernels.interpreted() else None
    torch.library.opcheck(torch.ops.dho_fast.dual_head_loss_triton.default, args, test_utils=utils)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, y: t.__setitem__((2, 5), float("nan")), "teacher_logits row 2 contains NaN"),
        (lambda t, y: t.__setitem__((3, 0), float("inf")), "teacher_logits row 3 contains NaN or \\+inf"),
        (lambda t, y: t.__setitem__(1, float("-inf")), "teacher_logits row 1 is -inf in every class"),
        (lambda t, y: y.__setitem__(4, 50), "labels\\[4\\] = 50 is out of range for 50 classes"),
        (lambda t, y: y.__setitem__(0, -3), "labels\\[0\\] = -3 is out of range"),
    ],
)
def test_bad_values_raise_naming_the_argument(edit, message):
    ce, kd, teacher, labels = inputs(6, 50, labelled="all")
    edit(teacher, labels)
    with pytest.raises(ValueError, match=message):
        dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="triton")


def chunked(op: str, inputs_, chunk: int, biases=None, **kwargs):
    """ce_term, kd_term and both gradients of the batch through the chunk op `op`, `chunk` rows at a time;
    biases: the op's keyword arguments ce_bias, kd_bias, ce_grad_scale, kd_grad_scale."""
    ce, kd, teacher, labels = inputs_
    n = labels.shape[0]
    num_labelled = int((labels != IGNORE).sum())
    terms, g_ce, g_kd = torch.zeros(2, dtype=torch.float64), [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        z_ce, z_kd = ce[rows][labels[rows] != IGNORE].clone(), kd[rows].clone()
        args = (z_ce, z_kd, teacher, labels, start, num_labelled, kwargs["temperature"], kwargs["kd_split"], IGNORE)
        op_call = getattr(torch.ops.dho_fast, op)
        terms += torch.stack(op_call(*args, kwargs["label_smoothing"], True, True, **(biases or {}))).cpu()
        g_ce.append(z_ce)
        g_kd.append(z_kd)
    return terms, torch.cat(g_ce), torch.cat(g_kd)


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunk_op_matches_the_cpu_chunk_op(dtype, chunk, biased):
    data = inputs(37, 130, dtype, labelled="mixed", masked_fraction=0.2)
    kwargs = dict(temperature=2.0, kd_split=True, label_smoothing=0.1)
    biases = None
    if biased:
        ce_bias, kd_bias = (torch.randn(130).to(DEVICE, dtype) for _ in range(2))
        biases = dict(ce_bias=ce_bias, kd_bias=kd_bias, ce_grad_scale=0.25, kd_grad_scale=1.5)
    got = chunked("dual_head_loss_chunk_triton", data, chunk, biases, **kwargs)
    cpu_biases = biases and {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in biases.items()}
    want = chunked("dual_head_loss_chunk", tuple(t.cpu() for t in data), chunk, cpu_biases, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.cpu(), w, **TOLERANCES[dtype])


def test_chunk_op_rejects_ce_rows_that_do_not_match_the_labels():
    ce, kd, teacher, labels = inputs(8, 20, labelled="all")
    with pytest.raises(ValueError, match="ce_logits must have one row per labelled row"):
        torch.ops.dho_fast.dual_head_loss_chunk_triton(
            ce[:3].clone(), kd[:4].clone(), teacher, labels, 0, 8, 2.0, True, IGNORE, 0.0, True, True
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [1, 7, 997])
def test_predict_matches_the_torch_blend(dtype, c, monkeypatch):
    ce, kd, _, _ = inputs(9, c, dtype)
    for max_tile in (triton_loss.MAX_TILE, 64):
        monkeypatch.setattr(triton_loss, "MAX_TILE", max_tile)
        got = torch.ops.dho_fast.dual_head_predict_triton(ce, kd, 0.3, 1.5)
        torch.testing.assert_close(got, blend.dual_head_predict(ce.cpu(), kd.cpu(), 0.3, 1.5).to(DEVICE))


@pytest.mark.parametrize("c", [1, 5, 997])
def test_search_counts_match_the_torch_grid(c):
    ce, kd, _, labels = inputs(12, c, labelled="all")
    alphas = torch.tensor(blend.DEFAULT_ALPHAS, device=DEVICE)
    betas = torch.tensor(blend.DEFAULT_BETAS, device=DEVICE)
    got = torch.ops.dho_fast.blend_search_triton(ce, kd, labels, alphas, betas).cpu()
    want = blend.search_alpha_beta(ce.cpu(), kd.cpu(), labels.cpu()).table * labels.shape[0]
    # Both compute each blend in float32; a near-tie may round differently, so allow a stray prediction.
    assert (got.double() - want).abs().max() <= 1 and (got.double() != want).sum() <= 2


def test_auto_backend_on_cpu_stays_the_cpu_kernel():
    assert dho_fast.ops.backends.resolve("dual_head_loss", "auto", torch.device("cpu")) in ("cpu", "reference")
    assert dho_fast.ops.backends.resolve("dual_head_loss", "triton", torch.device(DEVICE)) == "triton"
