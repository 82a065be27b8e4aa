"""fused_dual_head_loss and its per-chunk op on every backend against the float64 oracle (tests/helpers.py).

Each case is one test body parametrised by ``(backend, device)``: "cpu" and "reference" always, "triton" on CPU tensors
under the Triton interpreter (its own invocation: ``TRITON_INTERPRET=1 pytest -m triton tests``), "cuda" and
"triton-cuda" where there is a GPU. Every kernel output starts as NaN (DHO_FAST_POISON_OUTPUTS), so an element a
kernel fails to write fails the comparison.
"""

import os
import platform

import pytest
import torch
from helpers import (
    DTYPES,
    IGNORE,
    LOSS_BACKENDS,
    LOSS_KW,
    as_float64,
    assert_grad_within,
    assert_values_close,
    backend_params,
    check_loss,
    eager,
    fused,
    loss_terms_and_grads,
    make_inputs,
    oracle_loss,
    run_steps,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dho_fast
from dho_fast import kernels
from dho_fast.ops import extension
from dho_fast.ops.validation import loss_gradient_dtype

# Odd shapes (C = 1, N = 1, C = 997: rows not 16-byte aligned), around the CUDA kernel's warp-per-row limits (1024
# columns, 512 for float64), rows wider than Triton's widest tile (MAX_TILE = 4096: the two-pass path) and
# ImageNet-21k's C. The interpreter runs a program per row in Python: it skips the batches of many rows.
MANY_ROWS = pytest.mark.skipif(kernels.interpreted(), reason="many rows: slow under the Triton interpreter")
SHAPES = [
    (1, 1),
    (1, 7),
    (5, 1),
    (17, 997),
    (33, 512),
    (33, 513),
    (17, 1024),
    (17, 1025),
    (3, 21843),
    pytest.param((64, 1000), marks=MANY_ROWS),
    pytest.param((300, 997), marks=MANY_ROWS),
]
LABELLED = ["all", "none", "mixed", "block"]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("DHO_FAST_POISON_OUTPUTS", "1")


def inputs_on(device, *args, **kwargs):
    return make_inputs(*args, device=device, **kwargs)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("labelled", LABELLED)
def test_correctness(backend_device, shape, dtype, labelled):
    backend, device = backend_device
    check_loss(backend, inputs_on(device, *shape, dtype, labelled=labelled), dtype, **LOSS_KW)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("kd_reduction", ["split", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(40, 333), (5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_options(backend_device, shape, kd_reduction, label_smoothing):
    backend, device = backend_device
    kwargs = dict(temperature=4.0, ce_loss_weight=1.0, kd_loss_weight=0.3, kd_reduction=kd_reduction)
    inputs = inputs_on(device, *shape, labelled="mixed")
    check_loss(backend, inputs, torch.float32, label_smoothing=label_smoothing, **kwargs)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [513, 5000])
def test_extreme_logits_and_masked_teacher(backend_device, dtype, c):
    # Spreads of 1e4 overflow a naive exp; -inf teacher entries are masked classes.
    backend, device = backend_device
    scale = 1e4 if dtype != torch.float16 else 3e3  # fp16 cannot hold 1e4 * randn
    check_loss(backend, inputs_on(device, 16, c, dtype, scale=scale, masked_fraction=0.5), dtype, **LOSS_KW)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "case",
    [(1e2, 2, 0.0), (1e4, 2, 0.0), (1e5, 2, 0.0), (1e6, 2, 0.1), (1e7, 2, 0.0), (1e4 + 0.3, 1, 0.1)],
    ids=["offset 1e2", "offset 1e4", "offset 1e5", "smoothed at 1e6", "offset 1e7", "C=1 smoothed at 1e4"],
)
def test_ce_term_of_large_logits(backend_device, case):
    # Adding a constant to a row changes no softmax and no loss, so the loss terms must stay as accurate as the
    # terms themselves: CE = 1.3133 for logits (x, x + 1) with label 0, CE = 0 for one class. The CE rows are fixed:
    # whether a rounding error shows depends on the values, which must not depend on the run.
    backend, device = backend_device
    offset, c, label_smoothing = case
    ce = (offset + torch.arange(c, dtype=torch.float32)).expand(8, c).contiguous().to(device)
    _, kd, teacher, labels = inputs_on(device, 8, c, labelled="all")
    labels.zero_()
    inputs = (ce, kd + offset, teacher + offset, labels)
    check_loss(backend, inputs, torch.float32, label_smoothing=label_smoothing, **LOSS_KW)


def check_loss_as_accurate_as_eager(backend: str, inputs, dtype: torch.dtype, **kwargs) -> None:
    """check_loss, and each loss term within 16 ulps (2^-20) of its terms' magnitude of the float64 oracle, not the
    table's 1e-5: eager PyTorch's float32, which subtracts each row's maximum first, stays within 3 on these rows."""
    check_loss(backend, inputs, dtype, **kwargs)
    got = fused(backend)(*inputs, **kwargs)
    want = oracle_loss(*as_float64(*inputs), **kwargs)
    magnitudes = oracle_loss(*as_float64(*inputs), magnitudes="value", **kwargs)
    for name, g, w, m in zip(("loss", "ce_term", "kd_term"), got, want, magnitudes, strict=True):
        error, bound = abs(float(g) - float(w)), 2.0**-20 * float(m)
        assert error <= bound, f"{backend} {name}: got {float(g):.12g}, want {float(w):.12g}, bound {bound:.3g}"


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("shift", [1e4, 1e5, 1e6, 1e7], ids=lambda s: f"{s:.0e}")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_rows_shifted_by_a_large_constant(backend_device, shift, label_smoothing):
    # The same random rows plus a constant (labelled rows in the middle of the batch, unlabelled ones around them):
    # no softmax and no loss changes, so neither may the accuracy. The kernels used to round lse - x_y at the ulp of
    # the logits (CE 5.1406 instead of 5.2272 at 1e7). T = 2 keeps teacher / T and student / T exact.
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 12, 300, labelled="block")
    inputs = (ce + shift, kd + shift, teacher + shift, labels)
    check_loss_as_accurate_as_eager(backend, inputs, torch.float32, label_smoothing=label_smoothing, **LOSS_KW)


def near_float_max_batch(c: int, dtype: torch.dtype, device: str):
    """(ce, kd, teacher, labels) of rows at float32's maximum, plus a plain random row: constant 3e38 rows (CE =
    log C, KL = 0), rows of +-3e38 (x_c - x_y = -6e38 overflows float32; the labels are on +3e38 entries), a +-3e38
    teacher with a moderate student, a constant student with a moderate teacher, and -3e38 in the first 6/7 of the
    columns then +3e38 (whole blocks and tiles whose maxima are 6e38 below the row's). Row 2 is unlabelled."""
    big, cols = 3e38, torch.arange(c)
    const = torch.full((c,), big)
    ce_signs = torch.where(cols % 3 == 1, -big, big)
    kd_signs = torch.where(cols % 5 == 2, -big, big)
    halves = torch.where(cols < 6 * c // 7, -big, big)
    rows = [
        (const, const, const),
        (ce_signs, kd_signs, kd_signs),
        (ce_signs, 3 * torch.randn(c), kd_signs),
        (const, const, 3 * torch.randn(c)),
        (halves, halves, halves),
        tuple(3 * torch.randn(3, c)),
    ]
    ce, kd, teacher = (torch.stack([r[i] for r in rows]).to(device, dtype) for i in range(3))
    labels = torch.tensor([0, 0, IGNORE, c - 1, c - 1, c // 2], device=device)
    return ce, kd, teacher, labels


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [7, 700])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("temperature", [2.0, 1.0])
def test_rows_near_float_max(backend_device, dtype, c, label_smoothing, temperature, monkeypatch):
    # At T = 1 the maxima of a row's pieces (the CPU kernel's blocks, Triton's tiles: 64 columns here, so that C =
    # 700 takes several) can be 6e38 apart, more than float's maximum.
    backend, device = backend_device
    if backend == "triton":
        from dho_fast.kernels import dual_head_loss as triton_loss

        monkeypatch.setattr(triton_loss, "MAX_TILE", 64)
    kwargs = dict(LOSS_KW, temperature=temperature)
    check_loss(backend, near_float_max_batch(c, dtype, device), dtype, label_smoothing=label_smoothing, **kwargs)


def adversarial_batch(c: int, dtype: torch.dtype, device: str):
    """(ce, kd, teacher, labels) with rows built to break an online softmax, one per kind, plus a plain random row;
    labels alternate between column 0 and column C - 1."""
    neg_inf = float("-inf")
    rows = []
    one_hot = torch.full((c,), neg_inf)
    one_hot[-1] = 2.5
    rows.append((torch.randn(c), torch.randn(c), one_hot))  # teacher -inf in all classes but one
    rows.append((torch.full((c,), 7.25),) * 3)  # all equal
    rows.append(tuple(1e4 * torch.randn(3, c)))  # 1e4 spreads: a naive exp overflows
    rising = torch.linspace(-50.0, 50.0, c)
    rows.append((rising, rising.flip(0), rising))  # the maximum in the last block: every earlier block is rescaled
    if c > 1:
        masked = torch.randn(3, c)
        masked[2, ::2] = neg_inf
        masked[1, ::4] = neg_inf  # the student is -inf on half of the teacher's masked classes
        rows.append(tuple(masked))
    peak = torch.full((3, c), -1e4)
    peak[:, c // 2] = 1e4
    rows.append(tuple(peak))  # one entry 2e4 above the rest
    if c >= 6:
        apart = torch.randn(3, c)
        apart[0, :2], apart[1, 2:4], apart[2, 4:6] = torch.tensor([1e4, -1e4]), torch.tensor([1e4, -1e4]), 1e4
        rows.append(tuple(apart))  # each head's extremes in other columns
    rows.append(tuple(torch.randn(3, c)))
    ce, kd, teacher = (torch.stack([r[i] for r in rows]).to(device, dtype) for i in range(3))
    labels = (torch.arange(len(rows)) % 2 * (c - 1)).to(device)
    return ce, kd, teacher, labels


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c", [1, 2, 511, 1031])
@pytest.mark.parametrize("labelled", ["all", "mixed"])
def test_adversarial_rows(backend_device, c, dtype, labelled):
    backend, device = backend_device
    ce, kd, teacher, labels = adversarial_batch(c, dtype, device)
    if labelled == "mixed":
        labels[::3] = IGNORE
    # The Triton kernels take their scalar arguments in float32: 0.125 is exact there, as float64 inputs need.
    check_loss(backend, (ce, kd, teacher, labels), dtype, label_smoothing=0.125, **LOSS_KW)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_instruction_set_variant_of_the_cpu_kernel(capability, monkeypatch):
    # The CPU kernel is compiled per instruction set and chosen at each call (ATEN_CPU_CAPABILITY lowers it).
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        check_loss("cpu", make_inputs(9, 1037, dtype, masked_fraction=0.2), dtype, label_smoothing=0.1, **LOSS_KW)
        for c in (2, 511, 1031):
            check_loss("cpu", adversarial_batch(c, dtype, "cpu"), dtype, label_smoothing=0.1, **LOSS_KW)


ISA_RANK = {"default": 0, "avx2": 1, "avx512": 2}


def best_isa_of_this_cpu() -> str:
    """From the CPU's own flags, independently of the extension's choice."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pytest.skip("needs /proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


@pytest.mark.parametrize("capability", [None, "default", "avx2", "avx512"])
def test_cpu_kernel_isa_names_the_variant_that_runs(capability, monkeypatch):
    # What benchmarks record: the CPU's best instruction set, lowered (never raised) by ATEN_CPU_CAPABILITY.
    best = best_isa_of_this_cpu()
    if capability is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        assert extension.cpu_kernel_isa() == best
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        assert extension.cpu_kernel_isa() == min(capability, best, key=ISA_RANK.get)


@pytest.mark.parametrize("backend_device", backend_params("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("labelled", ["all", "none", "mixed"])
def test_triton_rows_wider_than_a_tile(backend_device, dtype, labelled, monkeypatch):
    # Rows wider than MAX_TILE take the two-pass path; a small tile runs it on small, fast inputs.
    from dho_fast.kernels import dual_head_loss as triton_loss

    backend, device = backend_device
    monkeypatch.setattr(triton_loss, "MAX_TILE", 64)
    for c in (65, 997):
        inputs = inputs_on(device, 9, c, dtype, labelled=labelled, masked_fraction=0.3)
        check_loss(backend, inputs, dtype, label_smoothing=0.1, **LOSS_KW)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_misaligned_and_strided_inputs(backend_device):
    # Views starting mid-row and transposed storage: the kernels read them through unaligned or copied paths.
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 21, 999, labelled="mixed")
    check_loss(backend, (ce[1:], kd[1:], teacher[1:], labels[1:]), torch.float32, **LOSS_KW)
    transposed = tuple(t.t().contiguous().t() for t in (ce, kd, teacher))
    check_loss(backend, (*transposed, labels), torch.float32, **LOSS_KW)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "combine",
    [lambda loss, ce, kd: 2.0 * loss + 3.0 * ce - kd, lambda loss, ce, kd: ce, lambda loss, ce, kd: 0.5 * kd],
    ids=["all", "ce_term", "kd_term"],
)
def test_gradients_of_the_logged_terms(backend_device, combine):
    # ce_term and kd_term are differentiable outputs too, alone or combined with the loss.
    backend, device = backend_device
    check_loss(backend, inputs_on(device, 12, 30), torch.float32, combine=combine, **LOSS_KW)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_no_labelled_rows_give_a_zero_ce_term_and_gradient(backend_device):
    backend, device = backend_device
    (loss, ce_term, _), (g_ce, _) = loss_terms_and_grads(
        fused(backend), *inputs_on(device, 6, 10, labelled="none"), **LOSS_KW
    )
    assert ce_term.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(g_ce) == 0


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_unlabelled_rows_get_no_ce_gradient(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 10, 20, labelled="mixed")
    labels[0], labels[1] = IGNORE, 3
    _, (g_ce, _) = loss_terms_and_grads(fused(backend), ce, kd, teacher, labels, **LOSS_KW)
    assert torch.count_nonzero(g_ce[labels == IGNORE]) == 0
    assert torch.count_nonzero(g_ce[1]) > 0


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_identical_distributions_give_zero_kd(backend_device):
    backend, device = backend_device
    ce, kd, _, labels = inputs_on(device, 8, 50, labelled="none")
    (_, _, kd_term), (_, g_kd) = loss_terms_and_grads(fused(backend), ce, kd, kd.clone(), labels, **LOSS_KW)
    assert abs(kd_term.item()) < 1e-5
    assert g_kd.abs().max() < 1e-6


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_only_the_needed_gradient_is_computed(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 4, 9)
    kd.requires_grad_()
    dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend).backward()
    assert kd.grad is not None and ce.grad is None


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_no_graph_without_grad(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 5, 9)
    want = oracle_loss(*as_float64(ce, kd, teacher, labels), **LOSS_KW)[0]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            loss = dho_fast.fused_dual_head_loss(ce.requires_grad_(), kd, teacher, labels, backend=backend)
        assert not loss.requires_grad
        assert_values_close(f"{backend} loss", loss, want, torch.float32)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_results_are_deterministic(backend_device):
    backend, device = backend_device
    # Large enough on a GPU for many blocks to race; the CPU's threads split rows too.
    inputs = inputs_on(device, 4096 if device == "cuda" else 64, 1000, labelled="mixed")
    first, second = (loss_terms_and_grads(fused(backend), *inputs, **LOSS_KW) for _ in range(2))
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert torch.equal(a, b)


def test_cpu_result_does_not_depend_on_the_thread_count():
    inputs = make_inputs(256, 700)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_terms_and_grads(fused("cpu"), *inputs, **LOSS_KW)
        torch.set_num_threads(max(2, os.cpu_count() or 2))
        many = loss_terms_and_grads(fused("cpu"), *inputs, **LOSS_KW)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[0] + one[1], many[0] + many[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 6, 11, torch.float64, masked_fraction=0.2)

    def loss(a, b):
        return dho_fast.fused_dual_head_loss(a, b, teacher, labels, backend=backend, label_smoothing=0.1, **LOSS_KW)

    # fast_mode (random projections instead of every input element) where the interpreter makes each call slow.
    fast = backend == "triton" and kernels.interpreted()
    assert torch.autograd.gradcheck(loss, (ce.requires_grad_(), kd.requires_grad_()), fast_mode=fast)


LOSS_OPS = {"cpu": "dual_head_loss", "cuda": "dual_head_loss", "triton": "dual_head_loss_triton"}
CHUNK_OPS = {"cpu": "dual_head_loss_chunk", "cuda": "dual_head_loss_chunk", "triton": "dual_head_loss_chunk_triton"}
KERNEL_BACKENDS = backend_params("cpu", "triton", "cuda", "triton-cuda")


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck(backend_device, requires_grad, dtype):
    # float16: the gradients the op returns are float32, which its fake implementation must say too.
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 7, 13, dtype)
    args = (ce.requires_grad_(requires_grad), kd.requires_grad_(requires_grad), teacher, labels)
    args += (2.0, 0.5, 0.5, True, IGNORE, 0.0, requires_grad, requires_grad)
    # The interpreter cannot run on fake tensors: the fake/compile checks of the Triton op run on a GPU and in
    # test_triton_trace.py.
    utils = ("test_schema", "test_autograd_registration") if backend == "triton" and device == "cpu" else None
    op = getattr(torch.ops.dho_fast, LOSS_OPS[backend]).default
    torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))


def run_chunks(backend: str, inputs, chunk: int, biases: dict, **kwargs):
    """(ce_term, kd_term) summed over the chunks and the gradients (the labelled rows' for the CE head), through
    ``backend``'s chunk op, ``chunk`` rows at a time: written over the logits for float32 and float64, into float32
    buffers (NaN-filled first) for half logits."""
    ce, kd, teacher, labels = inputs
    n = labels.shape[0]
    num_labelled = int((labels != IGNORE).sum())
    op = getattr(torch.ops.dho_fast, CHUNK_OPS[backend])
    half = ce.dtype in (torch.float16, torch.bfloat16)
    terms, g_ce, g_kd = torch.zeros(2, dtype=torch.float64), [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        z_ce, z_kd = ce[rows][labels[rows] != IGNORE].clone(), kd[rows].clone()
        grads = (z_ce, z_kd)
        outs = {}
        if half:
            grads = tuple(torch.full_like(z, float("nan"), dtype=torch.float32) for z in (z_ce, z_kd))
            outs = dict(ce_grad_out=grads[0], kd_grad_out=grads[1])
        args = (teacher, labels, start, num_labelled, kwargs["temperature"], kwargs["kd_split"], IGNORE)
        result = op(z_ce, z_kd, *args, kwargs["label_smoothing"], True, True, **biases, **outs)
        terms += torch.stack(result).double().cpu()
        g_ce.append(grads[0])
        g_kd.append(grads[1])
    return terms, torch.cat(g_ce), torch.cat(g_kd)


# (dtype, rows per chunk, kd_split, C): chunks of one row, chunks with a remainder, one chunk for the whole batch;
# rows of several column blocks (C = 1000) and wider than Triton's widest tile (C = 21843).
CHUNK_CASES = [
    (torch.float32, 1, True, 130),
    (torch.float32, 7, True, 130),
    (torch.float32, 64, False, 130),
    (torch.float64, 7, True, 130),
    (torch.bfloat16, 7, True, 130),
    (torch.float16, 64, True, 130),
    (torch.bfloat16, 16, True, 1000),
    (torch.float32, 16, True, 21843),
]


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype, chunk, kd_split, c", CHUNK_CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
def test_chunk_op(backend_device, dtype, chunk, kd_split, c, biased):
    # Per chunk: the chunk's share of the batch's ce_term and kd_term, of the logits plus the biases, and the
    # logits overwritten with the gradient of each term times its scale (the batch's row weights).
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 37, c, dtype, labelled="mixed", masked_fraction=0.2)
    kwargs = dict(temperature=2.0, kd_split=kd_split, label_smoothing=0.125)  # exact in float32, see above
    scales = (0.25, 1.5) if biased else (1.0, 1.0)
    biases = {}
    if biased:
        ce_bias, kd_bias = (torch.randn(c).to(device, dtype) for _ in range(2))
        biases = dict(ce_bias=ce_bias, kd_bias=kd_bias, ce_grad_scale=scales[0], kd_grad_scale=scales[1])
    terms, g_ce, g_kd = run_chunks(backend, (ce, kd, teacher, labels), chunk, biases, **kwargs)

    # The kernels add the biases in their accumulation dtype: the oracle's inputs are those sums, and eager
    # PyTorch's are the sums in float32 (float64 for float64 input), its gradients rounded to the dtype.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sums = [x.to(acc) + (biases[b].to(acc) if biased else 0.0) for x, b in ((ce, "ce_bias"), (kd, "kd_bias"))]
    loss_args = dict(temperature=2.0, kd_reduction="split" if kd_split else "mean", label_smoothing=0.125)

    def scaled_terms(_loss, ce_term, kd_term):
        return scales[0] * ce_term + scales[1] * kd_term

    oracle_inputs = as_float64(*sums, teacher, labels)
    want_terms, want = loss_terms_and_grads(oracle_loss, *oracle_inputs, combine=scaled_terms, **loss_args)
    value_magnitudes = oracle_loss(*oracle_inputs, magnitudes="value", **loss_args)
    _, magnitudes = loss_terms_and_grads(
        oracle_loss, *oracle_inputs, combine=scaled_terms, magnitudes="gradient", **loss_args
    )
    _, eager_grads = loss_terms_and_grads(eager, *sums, teacher.to(acc), labels, combine=scaled_terms, **loss_args)
    for i, name in enumerate(("ce_term", "kd_term")):
        assert_values_close(f"{backend} {name}", terms[i].to(acc), want_terms[i + 1], dtype, value_magnitudes[i + 1])
    labelled = labels != IGNORE
    rows = (labelled, slice(None))  # the chunk op writes a CE gradient row for the labelled rows only
    # The gradients are in the accumulation dtype, unrounded: held to its tolerances (float32's for half logits).
    for i, (name, got) in enumerate((("grad ce_logits", g_ce), ("grad kd_logits", g_kd))):
        assert_grad_within(f"{backend} {name}", got, want[i][rows[i]], acc, magnitude=magnitudes[i][rows[i]],
                           eager=eager_grads[i][rows[i]])  # fmt: skip


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.125])
def test_chunk_op_with_a_large_bias(backend_device, label_smoothing):
    # The chunk op (the fused linear op's step) adds the biases in its kernel, the label's logit included: biases
    # near 1e6 shift every row, which must leave the terms as accurate as eager PyTorch's (within 16 ulps of their
    # magnitude, as check_loss_as_accurate_as_eager).
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 9, 130, labelled="block")
    ce_bias, kd_bias = (1e6 + torch.randn(130).to(device) for _ in range(2))
    kwargs = dict(temperature=2.0, kd_split=True, label_smoothing=label_smoothing)
    terms, _, _ = run_chunks(backend, (ce, kd, teacher, labels), 4, dict(ce_bias=ce_bias, kd_bias=kd_bias), **kwargs)
    oracle_inputs = as_float64(ce + ce_bias, kd + kd_bias, teacher, labels)  # the sums the kernel forms in float32
    want = oracle_loss(*oracle_inputs, label_smoothing=label_smoothing)
    magnitudes = oracle_loss(*oracle_inputs, label_smoothing=label_smoothing, magnitudes="value")
    for i, name in enumerate(("ce_term", "kd_term")):
        error, bound = abs(float(terms[i]) - float(want[i + 1])), 2.0**-20 * float(magnitudes[i + 1])
        assert error <= bound, f"{backend} {name}: got {float(terms[i]):.12g}, want {float(want[i + 1]):.12g}"


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_op_gives_exactly_the_batch_op(backend_device, dtype):
    # The contract the fused linear op builds on: per-chunk terms sum to the batch op's terms and the logits are
    # overwritten with exactly the batch op's gradient rows (in the accumulation dtype; the batch op returns
    # bfloat16 logits' gradients rounded to bfloat16, which must be the chunk's rounded).
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 23, 600, dtype, labelled="mixed")
    batch_op = getattr(torch.ops.dho_fast, LOSS_OPS[backend])
    batch = batch_op(ce, kd, teacher, labels, 2.0, 0.5, 0.5, True, IGNORE, 0.1, True, True)
    terms, g_ce, g_kd = run_chunks(backend, (ce, kd, teacher, labels), 5, {}, temperature=2.0, kd_split=True,
                                   label_smoothing=0.1)  # fmt: skip
    assert batch[3].dtype == batch[4].dtype == loss_gradient_dtype(dtype)
    assert torch.equal(g_ce.to(batch[3].dtype), batch[3][labels != IGNORE])
    assert torch.equal(g_kd.to(batch[4].dtype), batch[4])
    for i in range(2):
        assert_values_close(f"{backend} term {i}", terms[i].to(batch[1].dtype), batch[1 + i].double(), dtype)


@pytest.mark.parametrize("backend_device", backend_params("cpu", "triton", "cuda", "triton-cuda"))
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_chunk_op(backend_device, biased, grad, dtype):
    # bfloat16: the gradients go to float32 buffers (ce_grad_out, kd_grad_out), arguments the op mutates.
    backend, device = backend_device
    ce, kd, teacher, labels = inputs_on(device, 13, 9, dtype, labelled="mixed")
    rows = slice(3, 9)
    ce_chunk, kd_chunk = ce[rows][labels[rows] != IGNORE].contiguous(), kd[rows].clone()
    num_labelled = int((labels != IGNORE).sum())
    args = (ce_chunk, kd_chunk, teacher, labels, 3, num_labelled, 2.0, True, IGNORE, 0.1, grad, grad)
    kwargs = {}
    if biased:
        kwargs = dict(ce_bias=torch.randn(9, device=device).to(dtype), kd_bias=torch.randn(9, device=device).to(dtype),
                      ce_grad_scale=0.3, kd_grad_scale=2.5)  # fmt: skip
    if dtype != torch.float32:
        kwargs.update(ce_grad_out=torch.empty_like(ce_chunk, dtype=torch.float32),
                      kd_grad_out=torch.empty_like(kd_chunk, dtype=torch.float32))  # fmt: skip
    utils = ("test_schema",) if backend == "triton" and device == "cpu" else None
    op = getattr(torch.ops.dho_fast, CHUNK_OPS[backend]).default
    torch.library.opcheck(op, args, kwargs, **({"test_utils": utils} if utils else {}))


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("backend_device", backend_params("cuda", "triton-cuda"))
def test_compiled_training_step_matches_eager_on_gpu(backend_device):
    # On the CPU, tests/test_compile.py compiles the CPU backend's step.
    backend, device = backend_device
    torch._dynamo.reset()
    ce, kd, teacher, labels = inputs_on(device, 64, 1000, labelled="mixed")
    features = torch.randn(64, 32, device=device)
    results = []
    for name, wrap in (("reference", lambda f: f), (backend, lambda f: torch.compile(f, fullgraph=True))):
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 2 * 1000).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        def step(model, name=name):
            ce_logits, kd_logits = model(features).chunk(2, dim=1)
            return dho_fast.fused_dual_head_loss(ce_logits, kd_logits, teacher, labels, backend=name)

        results.append(run_steps(wrap(step), model, opt)[1])
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 24),
    c=st.integers(1, 600),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    temperature=st.floats(0.25, 8.0),
    masked=st.sampled_from([0.0, 0.3, 0.9]),
    labelled=st.sampled_from(["all", "none", "mixed"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu_matches_the_oracle(n, c, scale, temperature, masked, labelled, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = make_inputs(n, c, scale=scale, masked_fraction=masked, labelled=labelled, generator=g)
    check_loss("cpu", inputs, torch.float32, temperature=temperature)
