"""The k-center step, dho_fast.ops.kcenter_update, on every backend: the running minimum against a float64 brute
force, the returned index against the first maximum of the kernel's own result, ties, picked points, non-finite
rows, argument checks, memory-mapped points, and the compiled op as torch sees it (schema, fake, backend table)."""

import math
import re

import numpy as np
import pytest
import torch
from helpers import backend_params

from dho_fast.ops import backends, kcenter_update
from dho_fast.ops.validation import kcenter_row_error

# Backends of kcenter_update; the Triton kernels (kernels/kcenter.py) add theirs here.
KCENTER_BACKENDS = backend_params("cpu", "reference", "cuda")
COMPILED_BACKENDS = backend_params("cpu", "cuda")
# float32 sums of C squares, each lane of at most C / 64 terms and a tree of 6 levels (csrc/kcenter_row.h), against
# float64 on the same (bf16-rounded) inputs: the error is a few ulp per term.
RTOL = 1e-5
INF = math.inf


def brute_force(points: torch.Tensor, centres: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The updated min_sq_dist in float64, from explicit differences (not torch.cdist's matrix-product form)."""
    p, c = points.double().cpu(), centres.double().cpu()
    sq = ((p[:, None, :] - c[None, :, :]) ** 2).sum(dim=2).amin(dim=1) if len(p) else p.new_empty(0)
    start = start.double().cpu()
    return torch.where(start < 0, start, torch.minimum(start, sq))


def first_max(min_sq_dist: torch.Tensor) -> tuple[int, float]:
    """The lowest index of the largest entry >= 0, by a loop; (-1, -inf) when there is none."""
    index, value = -1, -INF
    for i, v in enumerate(min_sq_dist.tolist()):
        if v >= 0 and v > value:
            index, value = i, v
    return index, value


def check_result(result, min_sq_dist: torch.Tensor, device: str) -> None:
    """The returned (index, value): 0-dim int64 and float32 on the points' device, the first maximum of min_sq_dist."""
    index, value = result
    assert index.shape == () and index.dtype == torch.int64 and index.device.type == device
    assert value.shape == () and value.dtype == torch.float32 and value.device.type == device
    assert (int(index), float(value)) == first_max(min_sq_dist)


def start_distances(n: int, device: str) -> torch.Tensor:
    """A pool mid-selection: +inf (no centre yet), finite minima from earlier centres, and picked points (< 0)."""
    start = torch.full((n,), INF)
    kind = torch.randint(0, 3, (n,))
    start[kind == 1] = torch.rand(int((kind == 1).sum())) * 50
    start[kind == 2] = -1.0
    return start.to(device)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("c", [1, 3, 997])
@pytest.mark.parametrize("n", [0, 1, 1000])
def test_matches_the_brute_force(backend_device, dtype, k, c, n):
    backend, device = backend_device
    points = torch.rand(n, c).to(dtype).to(device)
    centres = torch.rand(k, c, device=device)
    min_sq_dist = start_distances(n, device)
    want = brute_force(points, centres, min_sq_dist)
    result = kcenter_update(points, centres, min_sq_dist, backend=backend)
    torch.testing.assert_close(min_sq_dist.cpu().double(), want, rtol=RTOL, atol=0)
    check_result(result, min_sq_dist.cpu(), device)


def grid_inputs(n: int, c: int, k: int, device: str):
    """Points and centres on a grid of 1/8 in [0, 2): every difference, square and sum is exact in float32 (and
    bfloat16 holds the points exactly), so all backends must agree to the bit, ties included. The farthest point
    from every centre (all 4.0: more than 2 from a centre in each column, where the others are less) is duplicated at
    rows 3, 10 and n - 1."""
    points = torch.randint(0, 16, (n, c)) / 8
    points[[3, 10, n - 1]] = 4.0
    centres = torch.randint(0, 16, (k, c)) / 8
    return points.to(device), centres.to(device)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7])
def test_exact_inputs_agree_with_the_reference_and_ties_go_to_the_lowest_index(backend_device, dtype, k):
    backend, device = backend_device
    points, centres = grid_inputs(200, 131, k, device)
    points = points.to(dtype)
    min_sq_dist = torch.full((200,), INF, device=device)
    want_dist = min_sq_dist.cpu().clone()
    want = kcenter_update(points.cpu(), centres.cpu(), want_dist, backend="reference")
    index, value = kcenter_update(points, centres, min_sq_dist, backend=backend)
    assert torch.equal(min_sq_dist.cpu(), want_dist)
    assert (int(index), float(value)) == (int(want[0]), float(want[1])) == (3, float(want_dist[3]))
    # Picking it (min_sq_dist < 0) hands the maximum to its next duplicate.
    min_sq_dist[3] = -1.0
    index, _ = kcenter_update(points, centres, min_sq_dist, backend=backend)
    assert int(index) == 10


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_every_point_picked(backend_device):
    backend, device = backend_device
    points, centres = torch.rand(50, 9, device=device), torch.rand(2, 9, device=device)
    min_sq_dist = -torch.rand(50, device=device) - 0.5
    before = min_sq_dist.clone()
    result = kcenter_update(points, centres, min_sq_dist, backend=backend)
    assert torch.equal(min_sq_dist, before)
    check_result(result, min_sq_dist.cpu(), device)
    assert (int(result[0]), float(result[1])) == (-1, -INF)


# 4000 rows of 33: the CPU kernel's two threads take a half each, so a bad row in each half is found by each thread.
@pytest.mark.parametrize(
    "edit, bad_row",
    [
        (lambda p, c: p[5].fill_(math.nan), 5),
        (lambda p, c: p[2100].fill_(INF), 2100),
        (lambda p, c: (p[3000].fill_(math.nan), p[1999, 2].fill_(-INF)), 1999),
        (lambda p, c: p[33, 0].fill_(3e19), 33),  # finite, but its square overflows float32
        (lambda p, c: c[0, 4].fill_(math.nan), 0),  # a bad centre: the first row
    ],
    ids=["nan-row", "inf-row", "first-of-two", "overflow", "nan-centre"],
)
@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_a_non_finite_distance_names_the_first_row(backend_device, edit, bad_row):
    backend, device = backend_device
    points, centres = torch.rand(4000, 33), torch.rand(1, 33)
    edit(points, centres)
    min_sq_dist = torch.full((4000,), INF, device=device)
    with pytest.raises(ValueError) as info:
        kcenter_update(points.to(device), centres.to(device), min_sq_dist, backend=backend)
    assert str(info.value) == kcenter_row_error(bad_row)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_memory_mapped_points(backend_device, tmp_path):
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("a memory-mapped file is host memory")
    data = torch.rand(300, 37)
    array = np.memmap(tmp_path / "points.f32", dtype=np.float32, mode="w+", shape=data.shape)
    array[:] = data.numpy()
    array.flush()
    del array
    # r+: torch.from_numpy warns about read-only arrays; the op only reads it.
    points = torch.from_numpy(np.memmap(tmp_path / "points.f32", dtype=np.float32, mode="r+", shape=data.shape))
    centres = torch.rand(3, 37)
    start = start_distances(300, "cpu")
    min_sq_dist, in_memory = start.clone(), start.clone()
    result = kcenter_update(points, centres, min_sq_dist, backend=backend)
    want = kcenter_update(data, centres, in_memory, backend=backend)
    assert torch.equal(min_sq_dist, in_memory) and torch.equal(result[0], want[0])
    torch.testing.assert_close(min_sq_dist.double(), brute_force(data, centres, start), rtol=RTOL, atol=0)


def bad_arguments(device: str):
    """(arguments, exception type, words of the message) of kcenter_update."""
    p, c, m = torch.rand(6, 5, device=device), torch.rand(2, 5, device=device), torch.zeros(6, device=device)
    return [
        ((p[0], c, m), ValueError, "points must be of shape (N, C)"),
        ((p.double(), c, m), TypeError, "points must be float32 or bfloat16"),
        ((p.half(), c, m), TypeError, "points must be float32 or bfloat16"),
        ((p, c[:, :4], m), ValueError, "centres must be"),
        ((p, c[:0], m), ValueError, "centres must be"),
        ((p, c.bfloat16(), m), TypeError, "centres must be float32"),
        ((p, c, m[:5]), ValueError, "min_sq_dist must be"),
        ((p, c, m.double()), TypeError, "min_sq_dist must be float32"),
        ((p.t().contiguous().t(), c, m), ValueError, "points must be contiguous"),
        ((p, c.t().contiguous().t(), m), ValueError, "centres must be contiguous"),
        ((p, c, torch.zeros(12, device=device)[::2]), ValueError, "min_sq_dist must be contiguous"),
    ]


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_bad_arguments_name_the_argument(backend_device):
    backend, device = backend_device
    for args, error, words in bad_arguments(device):
        with pytest.raises(error, match=re.escape(words)):
            kcenter_update(*args, backend=backend)
    with pytest.raises(TypeError, match="points must be a tensor"):
        kcenter_update([[0.0]], torch.rand(1, 1), torch.zeros(1), backend=backend)
    with pytest.raises(ValueError, match="centres must be float32 of shape"):
        kcenter_update(torch.rand(3, 2), torch.rand(1, 2, device="meta"), torch.zeros(3), backend=backend)


@pytest.mark.parametrize("backend_device", COMPILED_BACKENDS)
def test_compiled_op_checks_its_own_arguments(backend_device):
    # Direct callers of torch.ops.dho_fast.kcenter_update bypass the Python checks; the op raises the same types.
    _, device = backend_device
    for args, error, words in bad_arguments(device):
        with pytest.raises(error, match=re.escape(words)):
            torch.ops.dho_fast.kcenter_update(*args)
    points = torch.rand(4, 3, device=device)
    points[2, 1] = math.nan
    with pytest.raises(ValueError) as info:
        torch.ops.dho_fast.kcenter_update(points, torch.rand(1, 3, device=device), torch.zeros(4, device=device))
    assert str(info.value) == kcenter_row_error(2)


def test_every_cpu_instruction_set_gives_the_same_bits(monkeypatch):
    # kernel_dispatch.h chooses the build per call from $ATEN_CPU_CAPABILITY (default, avx2; unset: the best).
    points, centres = torch.rand(500, 997), torch.rand(5, 997)
    start = start_distances(500, "cpu")
    results = {}
    for isa in ("default", "avx2", None):
        if isa is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", isa)
        min_sq_dist = start.clone()
        index, _ = kcenter_update(points, centres, min_sq_dist, backend="cpu")
        results[isa] = (min_sq_dist, int(index))
    for isa in ("default", "avx2"):
        assert torch.equal(results[isa][0], results[None][0]) and results[isa][1] == results[None][1], isa


@pytest.mark.parametrize("backend_device", backend_params("cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("c", [3, 1000, 997])
def test_cuda_computes_the_bits_of_the_cpu_kernel(backend_device, dtype, k, c):
    # One summation order (csrc/kcenter_row.h) on both, so near ties go the same way; C = 997 makes unaligned rows.
    points, centres = torch.rand(3000, c).to(dtype), torch.rand(k, c)
    start = start_distances(3000, "cpu")
    on_cpu, on_gpu = start.clone(), start.cuda()
    want = kcenter_update(points, centres, on_cpu, backend="cpu")
    got = kcenter_update(points.cuda(), centres.cuda(), on_gpu, backend="cuda")
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert (int(got[0]), float(got[1])) == (int(want[0]), float(want[1]))


@pytest.mark.parametrize("backend_device", COMPILED_BACKENDS)
def test_opcheck(backend_device):
    # The schema (min_sq_dist written in place), the fake implementation and the dispatcher agree.
    _, device = backend_device
    for dtype, k in ((torch.float32, 1), (torch.bfloat16, 3)):
        points, centres = torch.rand(40, 17, device=device).to(dtype), torch.rand(k, 17, device=device)
        torch.library.opcheck(torch.ops.dho_fast.kcenter_update.default, (points, centres, start_distances(40, device)))


def test_meta_tensors_give_meta_results():
    points, centres, min_sq_dist = (torch.empty(s, device="meta") for s in ((10, 4), (2, 4), (10,)))
    index, value = kcenter_update(points, centres, min_sq_dist)
    assert (index.device.type, index.dtype, index.shape) == ("meta", torch.int64, ())
    assert (value.device.type, value.dtype, value.shape) == ("meta", torch.float32, ())


def test_backend_table(monkeypatch):
    monkeypatch.delenv("DHO_FAST_BACKEND", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.resolve("kcenter_update", "auto", cpu) == "cpu"
    with pytest.raises(ValueError, match="backend='cuda' of kcenter_update needs CUDA tensors, got tensors on cpu"):
        backends.resolve("kcenter_update", "cuda", cpu)
    with pytest.raises(ValueError, match="backend='cpu' of kcenter_update has no autograd formula"):
        backends.resolve("kcenter_update", "cpu", cpu, wants_graph=True)
    if not torch.cuda.is_available():
        return
    assert backends.resolve("kcenter_update", "auto", cuda) in ("cuda", "triton")
