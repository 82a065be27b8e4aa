"""Peak memory of one call: the most bytes of tensors the call holds at once beyond those alive before it.

On CUDA that is the caching allocator's peak statistic. torch's CPU allocator keeps no such statistic, so on the CPU
the call runs once under the profiler with memory profiling on, which records every allocation and free of the CPU
allocator (every tensor, including an op's internal buffers) in order; the peak is the running sum's maximum.
"""

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(step, device: torch.device) -> int:
    """Peak bytes allocated by ``step()`` above what was allocated when it began (one extra, untimed call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(changes):
        held += size
        peak = max(peak, held)
    return peak
