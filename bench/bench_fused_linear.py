"""fused_linear_dual_head_loss against two eager nn.Linear + the eager loss, torch.compile of that, and bare GEMMs.

    .venv/bin/python -m pytest bench/bench_fused_linear.py --benchmark-only --benchmark-json=bench/results/linear.json
    .venv/bin/python bench/report.py bench/results/linear.json
    .venv/bin/python bench/bench_fused_linear.py          # the peak-memory comparison alone, as a table

Time, float32, forward and forward+backward: N = 512 rows (256 labelled), D = 512, C = 1000 (issue 3's target)
and an ImageNet-21k head (D = 768, C = 21843). Providers: "fused" (DualHead.loss), "eager" (the same DualHead's two
nn.Linear + bench/eager.py's loss), "compile" (torch.compile of that eager code) and "gemms", the matmuls the fused
op cannot avoid, timed alone: both heads' logits (the CE head over the labelled rows only) and, for the backward,
d features and d weights of both heads.

Peak memory, one forward+backward at N = 4096, D = 768, C = 21843 per provider, each in a fresh process: torch's
CPU allocator keeps no statistics and tracemalloc does not see its allocations, so the figure is the process's
resident-set high-water mark (VmHWM), reset to the current RSS just before the step (/proc/self/clear_refs), minus
that RSS: the memory the step adds on top of its inputs (the teacher logits alone are 358 MB). The process's whole
peak is recorded too.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from eager import eager_dual_head_loss

import dho_fast

TIME_SHAPES = [(512, 512, 1000), (512, 768, 21843)]
MEMORY_SHAPE = (4096, 768, 21843)
PROVIDERS = ["fused", "eager", "compile", "gemms"]


def make_batch(n: int, d: int, c: int, requires_grad: bool):
    """(features, head, teacher_logits, labels): half the rows labelled, in place to avoid transient copies."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = dho_fast.DualHead(d, c).requires_grad_(requires_grad)
    features = torch.randn(n, d, generator=g).requires_grad_(requires_grad)
    teacher = torch.randn(n, c, generator=g).mul_(3)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[n // 2 :] = -100
    return features, head, teacher, labels


def fused_step(features, head, teacher, labels):
    return head.loss(features, teacher, labels, backend="cpu")


def eager_step(features, head, teacher, labels):
    return eager_dual_head_loss(head.ce_head(features), head.kd_head(features), teacher, labels)


def gemm_step(features, head, labels, backward: bool):
    """The fused op's matmuls on stand-in logit gradients (their values do not change a GEMM's time)."""
    labelled = features[labels != -100]
    w_ce, w_kd = head.ce_head.weight.detach(), head.kd_head.weight.detach()
    x = features.detach()

    def step():
        z_ce = torch.mm(labelled, w_ce.t())
        z_kd = torch.mm(x, w_kd.t())
        if backward:
            torch.mm(z_ce, w_ce)
            torch.mm(z_kd, w_kd)
            torch.mm(z_ce.t(), labelled)
            torch.mm(z_kd.t(), x)

    return step


def timed_step(provider: str, features, head, teacher, labels, backward: bool):
    if provider == "gemms":
        return gemm_step(features.detach(), head, labels, backward)
    fn = {"fused": fused_step, "eager": eager_step, "compile": torch.compile(eager_step)}[provider]
    params = [features, *head.parameters()]

    def step():
        if backward:
            for p in params:
                p.grad = None
            fn(features, head, teacher, labels).backward()
        else:
            with torch.no_grad():
                fn(features, head, teacher, labels)

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", TIME_SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-C{s[2]}")
def test_fused_linear_time(record, shape, mode, provider):
    n, d, c = shape
    bench = record(f"fused_linear {mode} N={n} D={d} C={c} float32", provider=provider, mode=mode, backend="cpu")
    backward = mode == "forward+backward"
    step = timed_step(provider, *make_batch(n, d, c, requires_grad=backward), backward=backward)
    small = c <= 1000
    bench.pedantic(step, rounds=30 if small else 5, warmup_rounds=3 if small else 2, iterations=1)


def peak_memory_mib(provider: str) -> dict[str, float]:
    """Runs in a fresh process: one forward+backward of ``provider`` at MEMORY_SHAPE, as described above."""
    features, head, teacher, labels = make_batch(*MEMORY_SHAPE, requires_grad=True)
    step = {"fused": fused_step, "eager": eager_step}[provider]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step(features, head, teacher, labels).backward()
    peak = _status_kib("VmHWM")
    return {"extra_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_in_subprocess(provider: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", provider], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("provider", ["fused", "eager"])
def test_fused_linear_peak_memory(record, provider):
    n, d, c = MEMORY_SHAPE
    group = f"fused_linear peak memory N={n} D={d} C={c} float32 (figures in extra_info; time = the whole subprocess)"
    bench = record(group, provider=provider, mode="forward+backward", backend="cpu")
    figures = bench.pedantic(measure_in_subprocess, args=(provider,), rounds=1, iterations=1)
    bench.extra_info.update(figures)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(peak_memory_mib(sys.argv[2])))
    else:
        results = {p: measure_in_subprocess(p) for p in ("fused", "eager")}
        for p, r in results.items():
            print(f"{p:6s} extra peak {r['extra_peak_mib']:8.1f} MiB   process peak {r['process_peak_mib']:8.1f} MiB")
        for key in ("extra_peak_mib", "process_peak_mib"):
            print(f"fused / eager {key}: {results['fused'][key] / results['eager'][key]:.3f}")
