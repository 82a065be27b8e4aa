"""The Triton k-center step through the public op (``dho_fast.ops.kcenter_update(..., backend="triton")``:
validation, registration, backend table), against a float64 brute force and the reference backend.

Backends: "triton" (CPU tensors under the interpreter, marker ``triton``) and "triton-cuda" (marker ``gpu``). The
brute force takes every squared distance in float64 from the same (bf16-rounded) points. A float32 sum of C
non-negative squares, each of a rounded difference, is within ``(C + 3) u`` of the exact sum relatively (u = 2^-24)
in any summation order; the minimum keeps that bound. The pick is then checked exactly against the first maximum of
the updated distances the kernel wrote, and against the brute force's farthest point up to that rounding.
"""

import math

import pytest
import torch
from helpers import backend_params

from dho_fast.kernels import kcenter as triton_kcenter
from dho_fast.ops import backends, kcenter_update

KCENTER_BACKENDS = backend_params("triton", "triton-cuda")


def brute_force(points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor) -> torch.Tensor:
    """The updated min_sq_dist in float64, from every (point, centre) distance written out."""
    diff = points.double().unsqueeze(1) - centres.double().unsqueeze(0)
    nearest = diff.square().sum(dim=2).amin(dim=1) if len(points) else points.new_zeros(0, dtype=torch.float64)
    before = min_sq_dist.double()
    return torch.where(before < 0, before, torch.minimum(before, nearest))


def first_maximum(min_sq_dist: torch.Tensor) -> tuple[int, float]:
    """The lowest index of the largest entry >= 0 and that entry, (-1, -inf) if none."""
    candidates = [(float(v), i) for i, v in enumerate(min_sq_dist.tolist()) if v >= 0]
    if not candidates:
        return -1, -math.inf
    value = max(v for v, _ in candidates)
    return min(i for v, i in candidates if v == value), value


def rounding_bound(want: torch.Tensor, num_cols: int) -> torch.Tensor:
    """How far a float32 distance may be from the float64 one (module docstring)."""
    return (num_cols + 3) * 2.0**-24 * want.abs() + 2.0**-149


def random_state(n: int, device: str) -> torch.Tensor:
    """A running minimum mid-selection: never reached (+inf), an earlier minimum, or picked (negative)."""
    u = torch.rand(n)
    state = torch.where(u < 0.4, math.inf, torch.rand(n) * 40.0)
    return torch.where(u > 0.8, -torch.rand(n) - 1e-3, state).to(device)


def check_step(backend: str, points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor) -> int:
    """One call against the brute force and the reference backend; returns the index picked."""
    before = min_sq_dist.clone()
    want = brute_force(points.cpu(), centres.cpu(), before.cpu())
    with torch.no_grad():
        index, value = kcenter_update(points, centres, min_sq_dist, backend=backend)
    assert index.shape == value.shape == ()
    assert index.dtype == torch.int64 and value.dtype == torch.float32
    assert index.device == value.device == points.device
    got = min_sq_dist.cpu()
    picked = before.cpu() < 0
    assert torch.equal(got[picked], before.cpu()[picked]), "a picked entry changed"
    bound = rounding_bound(want, points.shape[1])
    error = (got.double() - want).abs()
    assert bool((error[~picked] <= bound[~picked]).all()), f"distances off by up to {float(error.max()):.3g}"
    assert (int(index), float(value)) == first_maximum(got), "not the first maximum of the updated distances"
    if int(index) >= 0:
        farthest = float(want[~picked].max())
        assert float(want[int(index)]) >= farthest - 2 * float(bound[~picked].max())

    ref_dist = before.clone()
    ref_index, _ = kcenter_update(points, centres, ref_dist, backend="reference")
    assert torch.allclose(min_sq_dist, ref_dist, rtol=2 * (points.shape[1] + 3) * 2.0**-24, atol=0.0)
    if int(index) != int(ref_index):  # a different pick only between points equally far up to rounding
        i, j = int(index), int(ref_index)
        assert abs(float(want[i] - want[j])) <= float(bound[i] + bound[j])
    return int(index)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [0, 1, 3, 97])
@pytest.mark.parametrize("n", [0, 1, 300])
@pytest.mark.parametrize("k", [1, 5])
def test_step(backend_device, dtype, c, n, k):
    backend, device = backend_device
    points = torch.rand(n, c).to(dtype).to(device)
    centres = torch.rand(k, c).to(device)
    check_step(backend, points, centres, random_state(n, device))


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("k, c", [(1, 515), (5, 67), (9, 67), (5, 64)])
def test_block_boundaries(backend_device, k, c):
    # N straddles the row blocks, C spans several column tiles (with a partial one but for C = 64) and K = 9 two
    # centre chunks; the farthest point is the last row, in a partial block.
    backend, device = backend_device
    block_n, block_k, block_c = triton_kcenter.tile_config(c, k)
    n = 2 * block_n + 1
    assert c > block_c and (c % block_c != 0) == (c != 64) and (k > block_k) == (k == 9)
    points = torch.rand(n, c)
    points[-1] += 2.0
    assert check_step(backend, points.to(device), torch.rand(k, c).to(device), torch.full((n,), math.inf)) == n - 1


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_every_point_picked(backend_device):
    backend, device = backend_device
    min_sq_dist = -torch.rand(40, device=device) - 1e-3
    before = min_sq_dist.clone()
    index, value = kcenter_update(torch.rand(40, 6, device=device), torch.rand(2, 6, device=device),
                                           min_sq_dist, backend=backend)  # fmt: skip
    assert (int(index), float(value)) == (-1, -math.inf)
    assert torch.equal(min_sq_dist, before)


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize("reduce_block", [triton_kcenter.REDUCE_BLOCK, 2])
def test_exact_ties_go_to_the_lowest_index(backend_device, reduce_block, monkeypatch):
    # Duplicates of the farthest point within a block, across blocks and (reduce_block 2) across iterations of the
    # reduction; a picked duplicate before them is skipped.
    monkeypatch.setattr(triton_kcenter, "REDUCE_BLOCK", reduce_block)
    backend, device = backend_device
    n, c = 300, 97
    block_n, _, _ = triton_kcenter.tile_config(c, 1)
    points = torch.rand(n, c)
    far = torch.rand(c) + 3.0
    rows = [3, 2 * block_n + 5, 2 * block_n + 6, 7 * block_n + 1]
    points[rows] = far
    min_sq_dist = torch.full((n,), math.inf)
    min_sq_dist[rows[0]] = -1.0
    assert check_step(backend, points.to(device), torch.rand(1, c).to(device), min_sq_dist.to(device)) == rows[1]


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_all_points_equal(backend_device):
    backend, device = backend_device
    points = torch.rand(1, 10).expand(300, 10).contiguous().to(torch.bfloat16).to(device)
    min_sq_dist = torch.full((300,), math.inf, device=device)
    min_sq_dist[:70] = -1.0
    assert check_step(backend, points, torch.rand(3, 10, device=device), min_sq_dist) == 70


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
@pytest.mark.parametrize(
    "poison, row",
    [
        ("nan", 123),
        ("inf", 40),
        ("overflow", 250),  # finite, but the squares overflow float32
        ("picked", 77),  # NaN in a picked row: its distance is still computed, as the reference does
        ("centre", 0),  # NaN in a centre: every row is bad
    ],
)
def test_non_finite_distance_names_the_row(backend_device, poison, row):
    backend, device = backend_device
    points, centres = torch.rand(300, 97), torch.rand(2, 97)
    min_sq_dist = torch.full((300,), math.inf)
    points[280, 3] = math.nan  # a later bad row: the first one is named
    if poison == "centre":
        centres[1, 5] = math.nan
    else:
        points[row, 5] = {"nan": math.nan, "inf": math.inf, "overflow": 3e38, "picked": math.nan}[poison]
    if poison == "picked":
        min_sq_dist[row] = -1.0
    min_sq_dist = min_sq_dist.to(device)
    before = min_sq_dist.clone()
    with pytest.raises(ValueError, match=f"^points row {row}: its squared distance to a centre is not finite"):
        kcenter_update(points.to(device), centres.to(device), min_sq_dist, backend=backend)
    assert min_sq_dist[row] == before[row]  # this backend leaves a bad row's entry as it was


@pytest.mark.parametrize("backend_device", KCENTER_BACKENDS)
def test_opcheck(backend_device):
    backend, device = backend_device
    op = torch.ops.dho_fast.kcenter_update_triton.default
    writes = [arg.name for arg in op._schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
    assert writes == ["min_sq_dist"]
    args = (torch.rand(40, 7, device=device), torch.rand(3, 7, device=device), random_state(40, device))
    # The interpreter cannot run on fake tensors: the fake/compile checks run on a GPU and in test_triton_trace.py.
    utils = ("test_schema", "test_autograd_registration") if device == "cpu" else None
    torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))


@pytest.mark.parametrize("backend_device", backend_params("triton"))
def test_backend_table(backend_device):
    device = torch.device(backend_device[1])
    assert backends.resolve("kcenter_update", "triton", device) == "triton"
    with pytest.raises(ValueError, match="backend='triton' of kcenter_update has no autograd formula"):
        backends.resolve("kcenter_update", "triton", device, wants_graph=True)
