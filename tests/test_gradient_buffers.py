"""The CPU loss kernel's gradient buffers (csrc/cpu/gradient_buffers.h): a freed buffer is handed out again for the
next gradient of its size, never one a tensor still holds; gradients in reused buffers are right; the profiler still
counts them; a training loop stops page-faulting for them; DHO_FAST_GRADIENT_CACHE is checked."""

import os
import resource
import subprocess
import sys

import pytest
import torch
from helpers import LOSS_KW, make_inputs

import dho_fast

pytestmark = pytest.mark.skipif(not dho_fast.ops.extension.has_extension(), reason="needs the compiled extension")

# (N, C) float32 gradients of 4 * 337 * 419 bytes (552 KiB): above the cache's 128 KiB floor, and a size no other
# test allocates, so that the buffers seen here are this test's.
N, C = 337, 419


def _saved_gradients(inputs):
    """The op's two gradients (the forward's buffers), for logits that require grad."""
    ce, kd = (x.detach().requires_grad_() for x in inputs[:2])
    weights = (LOSS_KW["ce_loss_weight"], LOSS_KW["kd_loss_weight"])
    out = torch.ops.dho_fast.dual_head_loss(ce, kd, *inputs[2:], 2.0, *weights, True, -100, 0.0, True, True, *weights)
    return out[3], out[4]


def test_a_freed_buffer_is_handed_out_again():
    inputs = make_inputs(N, C)
    first = {g.data_ptr() for g in _saved_gradients(inputs)}
    second = {g.data_ptr() for g in _saved_gradients(inputs)}  # the first call's gradients are freed by now
    assert second == first


def test_a_held_buffer_is_not_handed_out_and_keeps_its_values():
    inputs = make_inputs(N, C)
    held = _saved_gradients(inputs)
    kept = [g.clone() for g in held]
    other = _saved_gradients(make_inputs(N, C))
    assert not {g.data_ptr() for g in held} & {g.data_ptr() for g in other}
    for g, want in zip(held, kept, strict=True):
        assert torch.equal(g, want)


def test_gradients_in_reused_buffers_are_the_fresh_ones():
    inputs, stale = make_inputs(N, C), make_inputs(N, C)
    want = [g.clone() for g in _saved_gradients(inputs)]
    _saved_gradients(stale)  # leaves its values in the buffers the next call gets
    for g, w in zip(_saved_gradients(inputs), want, strict=True):
        assert torch.equal(g, w)


def test_the_profiler_counts_the_buffers():
    inputs = make_inputs(N, C)
    ce, kd = (x.detach().requires_grad_() for x in inputs[:2])
    _saved_gradients(inputs)  # a kept buffer then serves the profiled call: that must be counted too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        dho_fast.fused_dual_head_loss(ce, kd, *inputs[2:], backend="cpu", **LOSS_KW)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.name == "dho_fast::dual_head_loss")
    assert allocated >= 2 * 4 * N * C


def test_a_training_loop_stops_faulting_in_gradient_pages():
    # Each step's gradients (2 x 2 MB) would be 1000 fresh pages if malloc unmapped them on free, as it often does.
    ce0, kd0, teacher, labels = make_inputs(512, 1000)

    def step():
        ce, kd = ce0.detach().requires_grad_(), kd0.detach().requires_grad_()
        dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="cpu", **LOSS_KW).backward()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps = 20
    for _ in range(steps):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    assert faults < 100, f"{faults:.0f} page faults per step"


def test_a_bad_cache_setting_is_a_value_error():
    # The setting is read at the first gradient buffer of the cache's sizes.
    code = (
        "import torch, dho_fast; x = torch.randn(300, 300, requires_grad=True); "
        "dho_fast.fused_dual_head_loss(x, x, x.detach(), torch.zeros(300, dtype=torch.long))"
    )
    env = {**os.environ, "DHO_FAST_GRADIENT_CACHE": "yes"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert 'ValueError: DHO_FAST_GRADIENT_CACHE must be 0 (off) or 1 (on), got "yes"' in run.stderr
