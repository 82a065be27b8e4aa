"""The k-center step, dho_fast.ops.kcenter_update, on every backend: "cpu" and "reference" always, "triton" on CPU
tensors under the Triton interpreter (its own invocation: ``TRITON_INTERPRET=1 pytest -m triton``), "cuda" and
"triton-cuda" where there is a GPU. One test body per behaviour, parametrised by ``(backend, device)``.

Each call is checked by :func:`check_update`: the running minimum against a float64 brute force from the same
(bf16-rounded) points, within :func:`rounding_bound`; picked entries unchanged to the bit; the returned index the first
maximum of the distances the kernel wrote, and as far as the brute force's farthest point up to that rounding. Then
ties, picked points, non-finite rows and minima, argument checks, memory-mapped points, and what only one backend has:
the CPU kernel's instruction sets, the CUDA kernel's bits against the CPU's, the Triton kernel's block and reduction
boundaries, and the ops as torch sees them (schema, fake, opcheck, backend table).
"""

import math
import re

import numpy as np
import pytest
import torch
from helpers import backend_params

from dho_fast import kernels
from dho_fast.ops import backends, kcenter_update
from dho_fast.ops.validation import kcenter_row_error

KCENTER_BACKENDS = backend_params("cpu", "reference", "cuda", "triton", "triton-cuda")
COMPILED_BACKENDS = backend_params("cpu", "cuda")
TRITON_BACKENDS = backend_params("triton", "triton-cuda")
INF = math.inf


def pool_size(backend_device, n: int | str, c: int | str) -> tuple[int, int]:
    """(N, C) of a case: "many" rows and "wide" columns are 1000 and 997 (rows not 16-byte aligned, C >= 64 and not a
    multiple of a vector's width, so the CPU kernel's vector loops and their remainder run), but 300 and 97 under the
    Triton interpreter, which runs each program in Python."""
    interpreted = backend_device == ("triton", "cpu")
    n = {"many": 300 if interpreted else 1000}.get(n, n)
    c = {"wide": 97 if interpreted else 997}.get(c, c)
    return n, c


def brute_force(points: torch.Tensor, centres: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The updated min_sq_dist in float64, from every (point, centre) difference written out (not torch.cdist's
    matrix-product form); entries of ``start`` below 0 (picked points) kept."""
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


def rounding_bound(want: torch.Tensor, num_cols: int) -> torch.Tensor:
    """How far a float32 squared distance may be from the float64 one on the same inputs, in any summation order:
    a term's difference enters its square twice and the term then meets at most C roundings (multiplies, additions or
    fused multiply-adds), so the sum is within gamma_(C+2) <= (C + 3) u of the exact one relatively (u = 2^-24, C <
    4000), plus the smallest subnormal; the minimum over centres keeps the bound. The compiled backends' common order
    is checked to the bit by test_cuda_computes_the_bits_of_the_cpu_kernel and tests/cpp."""
    return (num_cols + 3) * 2.0**-24 * want.abs() + 2.0**-149


def check_update(backend: str, points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor) -> int:
    """One call of kcenter_update against the brute force (module docstring); returns the index picked."""
    before = min_sq_dist.cpu().clone()
    want = brute_force(points, centres, before)
    with torch.no_grad():
        index, value = kcenter_update(points, centres, min_sq_dist, backend=backend)
    assert index.shape == () and index.dtype == torch.int64 and index.device == points.device
    assert value.shape == () and value.dtype == torch.float32 and value.device == points.device
    got, picked = min_sq_dist.cpu(), before < 0
    assert torch.equal(got[picked], before[picked]), "a picked entry changed"
    bound = rounding_bound(want, points.shape[1])
    error = (got.double() - want).abs()
    assert bool((error[~picked] <= bound[~picked]).all()), f"distances off by up to {float(error.max()):.3g}"
    assert (int(index), float(value)) == first_max(got), "not the first maximum of the updated distances"
    if int(index) >= 0:
        farthest = float(want[~picked].max())
        assert float(want[int(index)]) >= farthest - 2 * float(bound[~picked].max())
    return int(index)


def start_distances(n: int, device: str) -> torch.Tensor:
    """A pool mid-selection: +inf (no centre yet), finite minima from earlier centres, and picked points (< 0)."""
    start = torch.full((n,), INF)
    kind = torch.randint(0, 3, (n,))
    start[kind == 1] = torch.rand(int((kind == 1).sum())) * 50
    start[kind == 2] = -torch.rand(int((kind == 2).sum())) - 1e-3
    return start.to(device)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("c", [0, 1, 3, "wide"])
@pytest.mark.parametrize("n", [0, 1, "many"])
def test_matches_the_brute_force(backend_device, dtype, k, c, n):
    backend, device = backend_device
    n, c = pool_size(backend_device, n, c)
    points = torch.rand(n, c).to(dtype).to(device)
    check_update(backend, points, torch.rand(k, c, device=device), start_distances(n, device))


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
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
    assert check_update(backend, points, centres, -torch.rand(50, device=device) - 1e-3) == -1


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_all_points_equal(backend_device):
    backend, device = backend_device
    points = torch.rand(1, 10).expand(300, 10).contiguous().to(torch.bfloat16).to(device)
    min_sq_dist = torch.full((300,), INF, device=device)
    min_sq_dist[:70] = -1.0
    assert check_update(backend, points, torch.rand(3, 10, device=device), min_sq_dist) == 70


# 4000 rows of 33: the CPU kernel's two threads take a half each, so a bad row in each half is found by each thread.
# The bad centre is the last one: with K = 2, one after a good centre.
@pytest.mark.parametrize(
    "edit, bad_row",
    [
        (lambda p, c: p[5].fill_(math.nan), 5),
        (lambda p, c: p[2100].fill_(INF), 2100),
        (lambda p, c: (p[3000].fill_(math.nan), p[1999, 2].fill_(-INF)), 1999),
        (lambda p, c: p[33, 0].fill_(3e19), 33),  # finite, but its square overflows float32
        (lambda p, c: p[250, 5].fill_(3e38), 250),  # finite, and so is its difference, but not its square
        (lambda p, c: c[-1, 4].fill_(math.nan), 0),  # a bad centre: the first row
    ],
    ids=["nan-row", "inf-row", "first-of-two", "overflow", "overflow-square", "nan-centre"],
)
@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("k", [1, 2])
def test_a_non_finite_distance_names_the_first_row(backend_device, k, edit, bad_row):
    backend, device = backend_device
    points, centres = torch.rand(4000, 33), torch.rand(k, 33)
    edit(points, centres)
    min_sq_dist = torch.full((4000,), INF, device=device)
    with pytest.raises(ValueError) as info:
        kcenter_update(points.to(device), centres.to(device), min_sq_dist, backend=backend)
    assert str(info.value) == kcenter_row_error(bad_row)
    assert min_sq_dist[bad_row] == INF  # the bad row's entry is left as it was


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("bad_centre", [0, 1, 2])
def test_an_infinite_distance_to_one_of_the_centres_is_an_error(backend_device, bad_centre):
    # Row 123 is at the other two centres' place in column 0 and 3e19 from the bad one, whose square overflows: its
    # nearest distance is finite, but a distance to one centre is not. Every other row is 1.5e19 from all three, whose
    # square (2.25e38) is finite.
    backend, device = backend_device
    points, centres = torch.rand(300, 33), torch.rand(3, 33)
    points[123, 0] = centres[:, 0] = 1.5e19
    centres[bad_centre, 0] = -1.5e19
    min_sq_dist = torch.full((300,), INF, device=device)
    with pytest.raises(ValueError) as info:
        kcenter_update(points.to(device), centres.to(device), min_sq_dist, backend=backend)
    assert str(info.value) == kcenter_row_error(123)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_a_picked_row_is_not_read(backend_device):
    # NaN and inf in picked rows (the first rows among them) are no error: those rows are not read, their entries
    # stay, and the rest is updated as without them.
    backend, device = backend_device
    points, min_sq_dist = torch.rand(300, 97), start_distances(300, "cpu")
    min_sq_dist[[0, 77, 299]] = -1.0
    points[0], points[77, 5], points[299, 96] = math.nan, INF, -INF
    check_update(backend, points.to(device), torch.rand(2, 97, device=device), min_sq_dist.to(device))


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_a_nan_minimum_names_its_row(backend_device):
    # Backends would disagree on it (a maximum to torch.max, skipped by the kernels), so every one refuses it.
    backend, device = backend_device
    min_sq_dist = start_distances(100, "cpu")
    min_sq_dist[[41, 60]] = math.nan
    min_sq_dist = min_sq_dist.to(device)
    before = min_sq_dist.clone()
    with pytest.raises(ValueError, match=r"^min_sq_dist must not hold NaN .* got NaN at row 41$"):
        kcenter_update(torch.rand(100, 5, device=device), torch.rand(1, 5, device=device), min_sq_dist, backend=backend)
    torch.testing.assert_close(min_sq_dist, before, rtol=0, atol=0, equal_nan=True)  # checked before any write


@pytest.mark.parametrize("backend_device", backend_params("cpu", "reference", "triton"))  # a memmap is host memory
def test_memory_mapped_points(backend_device, tmp_path):
    backend, _ = backend_device
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
    index = check_update(backend, points, centres, min_sq_dist)
    want, _ = kcenter_update(data, centres, in_memory, backend=backend)
    assert torch.equal(min_sq_dist, in_memory) and index == int(want)


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
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


@pytest.mark.parametrize("backend_device", TRITON_BACKENDS)
@pytest.mark.parametrize("k, c", [(1, 515), (5, 67), (9, 67), (5, 64)])
def test_triton_block_boundaries(backend_device, k, c):
    # N straddles the row blocks, C spans several column tiles (with a partial one but for C = 64) and K = 9 two
    # centre chunks; the farthest point is the last row, in a partial block.
    from dho_fast.kernels import kcenter as triton_kcenter

    backend, device = backend_device
    block_n, block_k, block_c = triton_kcenter.tile_config(c, k)
    n = 2 * block_n + 1
    assert c > block_c and (c % block_c != 0) == (c != 64) and (k > block_k) == (k == 9)
    points = torch.rand(n, c)
    points[-1] += 2.0
    min_sq_dist = torch.full((n,), INF, device=device)
    assert check_update(backend, points.to(device), torch.rand(k, c, device=device), min_sq_dist) == n - 1


@pytest.mark.parametrize("backend_device", TRITON_BACKENDS)
@pytest.mark.parametrize("reduce_block", ["default", 2])
def test_triton_ties_across_blocks_and_reduction_steps(backend_device, reduce_block, monkeypatch):
    # Duplicates of the farthest point within a block, across blocks and (reduce_block 2) across iterations of the
    # reduction; a picked duplicate before them is skipped.
    from dho_fast.kernels import kcenter as triton_kcenter

    if reduce_block != "default":
        monkeypatch.setattr(triton_kcenter, "REDUCE_BLOCK", reduce_block)
    backend, device = backend_device
    n, c = 300, 97
    block_n, _, _ = triton_kcenter.tile_config(c, 1)
    points = torch.rand(n, c)
    rows = [3, 2 * block_n + 5, 2 * block_n + 6, 7 * block_n + 1]
    points[rows] = torch.rand(c) + 3.0
    min_sq_dist = torch.full((n,), INF)
    min_sq_dist[rows[0]] = -1.0
    assert check_update(backend, points.to(device), torch.rand(1, c).to(device), min_sq_dist.to(device)) == rows[1]


def kcenter_op(backend: str):
    """The registered torch op a backend of kcenter_update calls."""
    if backend == "triton":
        return torch.ops.dho_fast.kcenter_update_triton.default
    return torch.ops.dho_fast.kcenter_update.default


@pytest.mark.parametrize("backend_device", backend_params("cpu", "cuda", "triton", "triton-cuda"))
def test_opcheck(backend_device):
    # The schema (min_sq_dist written in place, nothing else), the fake implementation and the dispatcher agree.
    backend, device = backend_device
    op = kcenter_op(backend)
    writes = [arg.name for arg in op._schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
    assert writes == ["min_sq_dist"]
    # The interpreter cannot run on fake tensors: the fake/compile checks of the Triton op run on a GPU and in
    # test_triton_trace.py.
    utils = {"test_utils": ("test_schema", "test_autograd_registration")} if backend_device == ("triton", "cpu") else {}
    for dtype, k in ((torch.float32, 1), (torch.bfloat16, 3)):
        points, centres = torch.rand(40, 17, device=device).to(dtype), torch.rand(k, 17, device=device)
        torch.library.opcheck(op, (points, centres, start_distances(40, device)), **utils)


def test_meta_tensors_give_meta_results():
    points, centres, min_sq_dist = (torch.empty(s, device="meta") for s in ((10, 4), (2, 4), (10,)))
    index, value = kcenter_update(points, centres, min_sq_dist)
    assert (index.device.type, index.dtype, index.shape) == ("meta", torch.int64, ())
    assert (value.device.type, value.dtype, value.shape) == ("meta", torch.float32, ())


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_backend_table(backend_device):
    backend, device = backend_device
    device = torch.device(device)
    assert backends.resolve("kcenter_update", backend, device) == backend
    with pytest.raises(ValueError, match=f"backend='{backend}' of kcenter_update has no autograd formula"):
        backends.resolve("kcenter_update", backend, device, wants_graph=True)


def test_auto_backend(monkeypatch):
    monkeypatch.delenv("DHO_FAST_BACKEND", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.resolve("kcenter_update", "auto", cpu) == "cpu"
    with pytest.raises(ValueError, match="backend='cuda' of kcenter_update needs CUDA tensors, got tensors on cpu"):
        backends.resolve("kcenter_update", "cuda", cpu)
    if kernels.has_triton() and not kernels.interpreted():
        with pytest.raises(ValueError, match="backend='triton' of kcenter_update needs CUDA tensors"):
            backends.resolve("kcenter_update", "triton", cpu)
    if torch.cuda.is_available():
        assert backends.resolve("kcenter_update", "auto", cuda) in ("cuda", "triton")
