"""kcenter_update, the step of PCoreSet's greedy k-center selection (one new centre lowers every pool point's running
minimum distance, and the farthest point is found), against eager PyTorch and torch.compile of it.

    .venv/bin/python -m pytest bench/bench_kcenter.py --benchmark-only --benchmark-json=build/kcenter.json
    .venv/bin/python bench/report.py build/kcenter.json

Cases: pools of (N, C) probability vectors, N = 65,536 over C = 200 and 1000 classes and N = 8192 over 21,843,
float32 and bf16 points, one float32 centre, mode "forward". Every step starts from a pool of +inf distances, so
every row is read. Providers: ``fused-<backend>`` per compiled backend of the device; ``eager``:
``torch.cdist`` to the centre, squared, ``torch.minimum`` into the running distances and ``argmax``;
``compile``: torch.compile of that; the yardstick ``read``: a sum over the pool, the time of reading it once.
The whole selection (pruning, extrapolated baselines) is bench/interleaved_kcenter.py.
"""

from functools import partial

import pytest
import torch
from cases import DTYPES, fused_backends

import dho_fast

POOL_SHAPES = ((65536, 200), (65536, 1000), (8192, 21843))


def make_pool(n: int, c: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    points = torch.softmax(1.5 * torch.randn(n, c, generator=g), dim=1).to(device, dtype)
    centre = torch.softmax(1.5 * torch.randn(1, c, generator=g), dim=1).to(device)
    return points, centre, torch.empty(n, device=device)


def eager_update(points, centres, min_sq_dist):
    d = torch.cdist(points.float(), centres).square().amin(1)
    torch.minimum(min_sq_dist, d, out=min_sq_dist)
    return min_sq_dist.argmax()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: f"N{s[0]}-C{s[1]}")
def test_kcenter_update(interleaved, device, shape, dtype):
    n, c = shape
    points, centre, min_sq_dist = make_pool(n, c, DTYPES[dtype], device)
    compiled = torch.compile(eager_update)

    def fresh(update):
        def step():
            min_sq_dist.fill_(float("inf"))
            update(points, centre, min_sq_dist)

        return step

    steps = {f"fused-{b}": fresh(partial(dho_fast.kcenter_update, backend=b)) for b in fused_backends(device)}
    steps.update(eager=fresh(eager_update), compile=fresh(compiled), read=lambda: points.sum())
    case = {"mode": "forward", "N": n, "C": c, "dtype": dtype}
    interleaved("kcenter_update", case, steps, rounds=20)
