"""What can be checked of the Triton kernels' GPU path without a GPU: they compile to sm_80 and sm_90 cubins
without spilling registers, and torch.compile traces into them (forward and backward) with no graph break.

Runs in the ordinary pytest invocation, without TRITON_INTERPRET (which makes the kernels Python functions).
"""

import logging
import operator
import os
import shutil
import subprocess
import tempfile

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import dho_fast
from dho_fast import kernels

pytestmark = [
    pytest.mark.slow,  # compiles kernels, traces with torch.compile
    pytest.mark.skipif(
        not kernels.has_triton() or kernels.interpreted(), reason="needs Triton, without TRITON_INTERPRET"
    ),
]

if kernels.has_triton() and not kernels.interpreted():
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from dho_fast.kernels import blend as triton_blend  # isort: skip
    from dho_fast.kernels import dual_head_loss as triton_loss  # isort: skip
    from dho_fast.kernels import kcenter as triton_kcenter  # isort: skip
    from dho_fast.kernels._row_math import smoothing_scale  # isort: skip

# Without a driver, torch cannot ask Triton which arguments a kernel writes and says so at length; it then assumes
# all of them, which is only less optimal.
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)


def compile_kernel(kernel, args: dict, arch: int, num_warps: int):
    """The kernel compiled for sm_<arch> with the argument types and constexprs of ``args`` (name -> value)."""
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = mangle_type(value)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def find_cuobjdump() -> str | None:
    """cuobjdump from Triton's bundled CUDA tools, the CUDA toolkit or PATH; None when none is installed."""
    candidates = ["/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")]
    if kernels.has_triton():
        import triton

        candidates.insert(0, os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


CUOBJDUMP = find_cuobjdump()


def local_memory_bytes(compiled) -> int:
    """Bytes of local memory (register spills) of a compiled kernel, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    local = [int(part.split(":")[1]) for part in usage.split() if part.startswith("LOCAL:")]
    assert local, f"cuobjdump reported no LOCAL usage:\n{usage}"
    return sum(local)


def t(dtype, *shape):
    return torch.zeros(*shape or (4,), dtype=dtype)


def loss_rows_args(dtype, num_classes: int, chunk: bool, teacher_form: int = 0):
    """The whole-batch op's launch, or (chunk) the chunk op's as the fused linear op makes it, with both biases; the
    gradients in the accumulation dtype, as both write them; the teacher of ``teacher_form`` (a sparse one's k = 5
    values in the accumulation dtype, its indices and row terms)."""
    block, single, warps = triton_loss.tile_config(num_classes)
    x, i64, acc = t(dtype, 2, 8), t(torch.int64), t(torch.promote_types(dtype, torch.float32))
    sparse = teacher_form == 2
    args = dict(
        ce_ptr=x, ce_row_ptr=i64, kd_ptr=x, t_ptr=acc if sparse else x, t_idx_ptr=i64,
        t_terms_ptr=acc if sparse else i64, teacher_width=5 if sparse else num_classes, TEACHER_FORM=teacher_form,
        labels_ptr=i64, info_ptr=i64, g_ce_ptr=acc, g_kd_ptr=acc,
        row_ce_ptr=acc, row_kl_ptr=acc, status_ptr=t(torch.int32), ce_bias_ptr=x if chunk else i64,
        kd_bias_ptr=x if chunk else i64, num_classes=num_classes, num_rows=512, num_labelled=256, ce_rows=256,
        ignore_index=-100, temperature=2.0, label_smoothing=0.1, smoothing_scale=smoothing_scale(num_classes),
        ce_grad_scale=0.5, kd_grad_scale=0.5,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32, CE_ROW=chunk, COUNT_ON_DEVICE=not chunk,
        KD_SPLIT=True, SMOOTH=True, CE_GRAD=True, KD_GRAD=True, BLOCK_C=block, SINGLE_TILE=single,
        HAS_CE_BIAS=chunk, HAS_KD_BIAS=chunk,
    )  # fmt: skip
    return args, warps


def kernel_cases():
    """(name, kernel, args, num_warps, archs) of every kernel in the configurations the ops launch."""
    i64 = t(torch.int64)
    args = dict(labels_ptr=i64, info_ptr=i64, n=512, num_classes=1000, ignore_index=-100, BLOCK=1024)
    cases = [("count_labels", triton_loss._count_labels_kernel, args, 4, (80, 90))]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for c in (1000, 21843):
            args, warps = loss_rows_args(dtype, c, chunk=False)
            archs = (80, 90) if dtype in (torch.float32, torch.bfloat16) else (90,)
            cases.append((f"loss_rows {dtype} C={c}", triton_loss._loss_rows_kernel, args, warps, archs))
    args, warps = loss_rows_args(torch.bfloat16, 21843, chunk=True)
    cases.append(("loss_rows chunk", triton_loss._loss_rows_kernel, args, warps, (90,)))
    for form, name in ((1, "probabilities"), (2, "top-5")):
        for c in (1000, 21843):
            args, warps = loss_rows_args(torch.float32, c, chunk=False, teacher_form=form)
            cases.append((f"loss_rows {name} teacher C={c}", triton_loss._loss_rows_kernel, args, warps, (80, 90)))
    args, warps = loss_rows_args(torch.bfloat16, 21843, chunk=True, teacher_form=2)
    cases.append(("loss_rows chunk top-5 teacher", triton_loss._loss_rows_kernel, args, warps, (90,)))
    for acc in (torch.float32, torch.float64):
        f = t(acc)
        args = dict(row_ce_ptr=f, row_kl_ptr=f, status_ptr=t(torch.int32), info_ptr=i64, loss_ptr=f,
                    ce_term_ptr=f, kd_term_ptr=f, n=512, ce_loss_weight=0.5, kd_loss_weight=0.5, HAS_LOSS=True,
                    BLOCK=1024)  # fmt: skip
        cases.append((f"reduce_rows {acc}", triton_loss._reduce_rows_kernel, args, 4, (90,)))
    for dtype, c in ((torch.float32, 1000), (torch.bfloat16, 21843)):
        block, single, warps = triton_loss.tile_config(c)
        args = dict(ce_ptr=t(dtype), kd_ptr=t(dtype), out_ptr=t(torch.float32), num_classes=c, alpha=0.5, beta=2.0,
                    ACC=tl.float32, BLOCK_C=block, SINGLE_TILE=single)  # fmt: skip
        cases.append((f"predict {dtype} C={c}", triton_blend._predict_kernel, args, warps, (90,)))
    f32 = t(torch.float32)
    args = dict(ce_ptr=f32, kd_ptr=f32, labels_ptr=i64, alphas_ptr=f32, betas_ptr=f32, correct_ptr=t(torch.int32),
                num_rows=50000, num_classes=1000, num_alphas=21, num_betas=7, ACC=tl.float32, BLOCK_C=512, BLOCK_A=32,
                BLOCK_B=8)  # fmt: skip
    cases.append(("search", triton_blend._search_kernel, args, 4, (80, 90)))
    # A pick's one new centre, and the first call's K = |L| centres (several chunks).
    for dtype in (torch.float32, torch.bfloat16):
        for k in (1, 100):
            block_n, block_k, block_c = triton_kcenter.tile_config(1000, k)
            args = dict(points_ptr=t(dtype), centres_ptr=f32, dist_ptr=f32, best_ptr=f32, best_row_ptr=i64,
                        bad_row_ptr=i64, num_rows=100000, num_cols=1000, num_centres=k, BLOCK_N=block_n,
                        BLOCK_K=block_k, BLOCK_C=block_c, ROW_ALIGN=8)  # fmt: skip
            cases.append((f"kcenter_rows {dtype} K={k}", triton_kcenter._rows_kernel, args, 4, (80, 90)))
    args = dict(best_ptr=f32, best_row_ptr=i64, bad_row_ptr=i64, index_ptr=i64, value_ptr=f32, first_bad_ptr=i64,
                num_blocks=6250, num_rows=100000, BLOCK=triton_kcenter.REDUCE_BLOCK)  # fmt: skip
    cases.append(("kcenter_reduce", triton_kcenter._reduce_kernel, args, 4, (80, 90)))
    return cases


@pytest.fixture(scope="module")
def compiled_kernels():
    """(name, arch, compiled kernel) of every case of :func:`kernel_cases` for each of its architectures."""
    return [
        (name, arch, compile_kernel(kernel, args, arch, warps))
        for name, kernel, args, warps, archs in kernel_cases()
        for arch in archs
    ]


def test_kernels_compile_for_the_default_architectures(compiled_kernels):
    for name, arch, compiled in compiled_kernels:
        assert compiled.asm["cubin"], f"{name}: no cubin for sm_{arch}"


@pytest.mark.skipif(CUOBJDUMP is None, reason="needs cuobjdump (Triton's bundled CUDA tools or a CUDA toolkit)")
def test_kernels_do_not_spill_registers(compiled_kernels):
    for name, arch, compiled in compiled_kernels:
        assert local_memory_bytes(compiled) == 0, f"{name} spills registers on sm_{arch}"


def fake_inputs(mode, n: int, c: int, device: str = "cuda"):
    with mode:
        ce = torch.randn(n, c, device=device, requires_grad=True)
        kd = torch.randn(n, c, device=device, requires_grad=True)
        teacher = torch.randn(n, c, device=device)
        labels = torch.randint(0, c, (n,), device=device)
    return ce, kd, teacher, labels


def triton_kernels_in(graph: torch.fx.GraphModule) -> list[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return [
        kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
        for node in graph.graph.nodes
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target)
    ]


LOSS_KERNELS = ["_count_labels_kernel", "_loss_rows_kernel", "_reduce_rows_kernel"]
# temperature, ce_weight, kd_weight, kd_split, ignore_index, label_smoothing, ce_grad, kd_grad
OP_SCALARS = (2.0, 0.5, 0.5, True, -100, 0.0, True, True)


def trace(fn, *inputs) -> torch.fx.GraphModule:
    """What AOTAutograd does under torch.compile: functionalise, then trace with fake tensors."""
    return make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*inputs)


def test_public_api_traces_into_the_kernels():
    def loss(ce, kd, teacher, labels):
        return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="triton")

    graph = trace(loss, *fake_inputs(FakeTensorMode(), 8, 1000))
    assert triton_kernels_in(graph) == LOSS_KERNELS
    assert "_assert_async" in graph.code  # the value checks, without a host sync


def test_backward_only_scales_the_gradients_of_the_forward():
    # Autograd needs a device for CUDA tensors, even fake ones: CPU fake tensors call the same op and kernels.
    def step(ce, kd, teacher, labels):
        terms = torch.ops.dho_fast.dual_head_loss_triton(ce, kd, teacher, labels, *OP_SCALARS)
        return torch.autograd.grad(terms[0] + 0.5 * terms[1], (ce, kd))

    graph = trace(step, *fake_inputs(FakeTensorMode(), 8, 1000, device="cpu"))
    assert triton_kernels_in(graph) == LOSS_KERNELS
    nodes = [node for node in graph.graph.nodes if node.op == "call_function"]
    last_kernel = max(i for i, node in enumerate(nodes) if "triton_kernel_wrapper" in str(node.target))
    after = {getattr(node.target, "__name__", str(node.target)).split(".")[0] for node in nodes[last_kernel + 1 :]}
    assert after <= {"getitem", "select", "eq", "_assert_async", "add", "mul", "ones_like"}, after


def test_blend_ops_trace_into_their_kernels():
    mode = FakeTensorMode()
    ce, kd, _, labels = fake_inputs(mode, 8, 100)

    def blend(ce, kd, labels, alphas, betas):
        predict = torch.ops.dho_fast.dual_head_predict_triton(ce, kd, 0.5, 2.0)
        return predict, torch.ops.dho_fast.blend_search_triton(ce, kd, labels, alphas, betas)

    with mode:
        alphas = torch.tensor(dho_fast.ops.blend.DEFAULT_ALPHAS, device="cuda")
        betas = torch.tensor(dho_fast.ops.blend.DEFAULT_BETAS, device="cuda")
    graph = trace(blend, ce.detach(), kd.detach(), labels, alphas, betas)
    assert triton_kernels_in(graph) == ["_predict_kernel", "_search_kernel"]


class Captured(Exception):
    """Raised in place of running a captured graph: there is no GPU to run the kernels on."""


def compiled_graph(fn, *inputs) -> torch.fx.GraphModule:
    """The forward graph torch.compile(fullgraph=True) makes of ``fn`` on ``inputs`` (through AOTAutograd), caught
    before it runs. Callers let CPU tensors stand in for CUDA ones (kernels.supports_device): the kernels are traced,
    never run."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Captured

        return run

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
    with pytest.raises(Captured):
        compiled(*inputs)
    return graphs[0]


def test_compile_captures_the_public_api_in_one_graph(monkeypatch):
    monkeypatch.setattr(kernels, "supports_device", lambda device: True)

    def loss(ce, kd, teacher, labels):
        return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="triton")

    ce, kd = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100, requires_grad=True)
    graph = compiled_graph(loss, ce, kd, torch.randn(8, 100), torch.randint(0, 100, (8,)))
    assert triton_kernels_in(graph) == LOSS_KERNELS


def test_compile_captures_the_kcenter_step_in_one_graph(monkeypatch):
    monkeypatch.setattr(kernels, "supports_device", lambda device: True)

    def step(points, centres, min_sq_dist):
        return dho_fast.ops.kcenter_update(points, centres, min_sq_dist, backend="triton")

    graph = compiled_graph(step, torch.rand(300, 97), torch.rand(2, 97), torch.full((300,), float("inf")))
    assert triton_kernels_in(graph) == ["_rows_kernel", "_reduce_kernel"]
    assert "_assert_async" in graph.code  # the finiteness check, without a host sync
    # The updated min_sq_dist leaves the graph, for AOTAutograd to copy into the caller's tensor.
    returned = [node.args[1] for node in graph.graph.output_node().args[0] if node.target is operator.getitem]
    assert {"dist_ptr", "index_ptr", "value_ptr"} <= set(returned)
