"""The CUDA and Triton backends against the reference on a GPU. Skipped where there is none; written for the day a
GPU runs them:

    .venv/bin/python -m pytest tests/test_gpu.py

These have never run: this project's machines have no GPU. The arithmetic they cover is exercised on the CPU by
tests/cpp/test_row_fold.cpp (CUDA) and tests/test_triton.py (Triton, interpreted).
"""

import pytest
import torch
from helpers import IGNORE, TOLERANCES, assert_backend_matches_reference, make_inputs, run_backend, run_steps

import dho_fast
from dho_fast import kernels
from dho_fast.ops import blend, extension

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

BACKENDS = (["cuda"] if extension.has_cuda_kernels() else []) + (["triton"] if kernels.has_triton() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Around the warp-per-row limit (1024 columns; 512 for float64), odd C (rows not 16-byte aligned), ImageNet-21k.
SHAPES = [(1, 1), (5, 7), (33, 512), (33, 513), (64, 1000), (17, 1024), (17, 1025), (9, 21843), (300, 997)]
KW = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5)
CHUNK_OPS = {"cuda": "dual_head_loss_chunk", "triton": "dual_head_loss_chunk_triton"}


def cuda_inputs(*args, **kwargs):
    return make_inputs(*args, device="cuda", **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
def test_matches_reference(backend, shape, dtype, labelled):
    assert_backend_matches_reference(backend, cuda_inputs(*shape, dtype, labelled=labelled), dtype, **KW)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kd_reduction", ["split", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_options_match_reference(backend, kd_reduction, label_smoothing):
    kwargs = dict(temperature=4.0, ce_loss_weight=1.0, kd_loss_weight=0.3, kd_reduction=kd_reduction)
    inputs = cuda_inputs(40, 3333, labelled="mixed")
    assert_backend_matches_reference(backend, inputs, torch.float32, label_smoothing=label_smoothing, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [513, 1000, 5000])
def test_extreme_logits_and_masked_teacher(backend, dtype, c):
    scale = 1e4 if dtype != torch.float16 else 3e3
    inputs = cuda_inputs(32, c, dtype, scale=scale, masked_fraction=0.5)
    assert_backend_matches_reference(backend, inputs, dtype, **KW)


@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_and_strided_inputs(backend):
    # Views starting mid-row and transposed storage: the kernels read them through unaligned or scalar paths.
    ce, kd, teacher, labels = cuda_inputs(21, 999, labelled="mixed")
    views = (ce[1:], kd[1:], teacher[1:], labels[1:])
    assert_backend_matches_reference(backend, views, torch.float32, **KW)
    transposed = tuple(t.t().contiguous().t() for t in (ce, kd, teacher)) + (labels,)
    assert_backend_matches_reference(backend, transposed, torch.float32, **KW)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1000, 21843])
def test_every_gradient_element_is_written(backend, c, monkeypatch):
    monkeypatch.setenv("DHO_FAST_POISON_OUTPUTS", "1")
    *_, g_ce, g_kd = run_backend(backend, *cuda_inputs(13, c, torch.bfloat16, labelled="mixed"), **KW)
    assert torch.isfinite(g_ce).all() and torch.isfinite(g_kd).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_deterministic(backend):
    inputs = cuda_inputs(4096, 1000, labelled="mixed")
    first, second = run_backend(backend, *inputs, **KW), run_backend(backend, *inputs, **KW)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    ce, kd, teacher, labels = cuda_inputs(6, 11, torch.float64, masked_fraction=0.2)

    def loss(a, b):
        return dho_fast.fused_dual_head_loss(a, b, teacher, labels, backend=backend, label_smoothing=0.25, **KW)

    assert torch.autograd.gradcheck(loss, (ce.requires_grad_(), kd.requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(backend, requires_grad):
    ce, kd, teacher, labels = cuda_inputs(7, 13)
    args = (ce.requires_grad_(requires_grad), kd.requires_grad_(requires_grad), teacher, labels)
    args += (2.0, 0.5, 0.5, True, IGNORE, 0.0, requires_grad, requires_grad)
    op = torch.ops.dho_fast.dual_head_loss if backend == "cuda" else torch.ops.dho_fast.dual_head_loss_triton
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, y: t.__setitem__((2, 5), float("nan")), "teacher_logits row 2 contains NaN"),
        (lambda t, y: t.__setitem__(1, float("-inf")), "teacher_logits row 1 is -inf in every class"),
        (lambda t, y: y.__setitem__(4, 50), "labels\\[4\\] = 50 is out of range for 50 classes"),
    ],
)
def test_bad_values_raise_naming_the_argument(backend, edit, message):
    ce, kd, teacher, labels = cuda_inputs(6, 50, labelled="all")
    edit(teacher, labels)
    with pytest.raises((ValueError, RuntimeError), match=message):
        dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [130, 1000, 21843])
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
def test_chunk_op_matches_the_cpu_chunk_op(backend, dtype, c, biased):
    ce, kd, teacher, labels = cuda_inputs(37, c, dtype, labelled="mixed", masked_fraction=0.2)
    num_labelled = int((labels != IGNORE).sum())
    ce_bias, kd_bias = (torch.randn(c).to(dtype) for _ in range(2))
    for start, stop in ((0, 16), (16, 37)):
        rows = labels[start:stop] != IGNORE
        outputs = []
        for op, device in ((CHUNK_OPS[backend], "cuda"), ("dual_head_loss_chunk", "cpu")):
            z_ce, z_kd = ce[start:stop][rows].to(device), kd[start:stop].clone().to(device)
            args = (teacher.to(device), labels.to(device), start, num_labelled, 2.0, True, IGNORE, 0.1, True, True)
            biases = {}
            if biased:
                biases = dict(ce_bias=ce_bias.to(device), kd_bias=kd_bias.to(device), ce_grad_scale=0.25,
                              kd_grad_scale=1.5)  # fmt: skip
            terms = getattr(torch.ops.dho_fast, op)(z_ce, z_kd, *args, **biases)
            outputs.append((torch.stack(terms).cpu(), z_ce.cpu(), z_kd.cpu()))
        (terms, g_ce, g_kd), (want_terms, want_ce, want_kd) = outputs
        torch.testing.assert_close(terms, want_terms, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_ce, want_ce, **TOLERANCES[dtype])
        torch.testing.assert_close(g_kd, want_kd, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    ce, kd, teacher, labels = cuda_inputs(64, 1000, labelled="mixed")
    features = torch.randn(64, 32, device="cuda")
    results = []
    for name, wrap in (("reference", lambda f: f), (backend, lambda f: torch.compile(f, fullgraph=True))):
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 2 * 1000).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        def step(model, name=name):
            ce_logits, kd_logits = model(features).chunk(2, dim=1)
            return dho_fast.fused_dual_head_loss(ce_logits, kd_logits, teacher, labels, backend=name)

        results.append(run_steps(wrap(step), model, opt)[1])
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not kernels.has_triton(), reason="needs Triton")
@pytest.mark.parametrize("c", [7, 1000, 21843])
def test_blend_on_gpu_matches_the_torch_blend(c):
    ce, kd, _, labels = cuda_inputs(256, c, labelled="all")
    with torch.no_grad():
        got = blend.dual_head_predict(ce, kd, 0.3, 1.5)  # the Triton kernel on CUDA tensors
    torch.testing.assert_close(got.cpu(), blend.dual_head_predict(ce.cpu(), kd.cpu(), 0.3, 1.5))
    table = blend.search_alpha_beta(ce, kd, labels).table
    want = blend.search_alpha_beta(ce.cpu(), kd.cpu(), labels.cpu()).table
    assert (table - want).abs().max() <= 1 / 256 and (table != want).sum() <= 2
