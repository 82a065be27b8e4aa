"""torch.compile traces a training step that calls the fused op, with no graph break."""

import pytest
import torch
from helpers import make_inputs, run_steps

import dho_fast

pytestmark = pytest.mark.slow  # torch.compile


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    ce, kd, teacher, labels = make_inputs(16, 37, labelled="mixed")
    features = torch.randn(16, 8)

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 2 * 37)

    def forward(model, backend):
        ce_logits, kd_logits = model(features).chunk(2, dim=1)
        return dho_fast.fused_dual_head_loss(ce_logits, kd_logits, teacher, labels, backend=backend)

    results = []
    # The forward (model + fused loss) is compiled as one graph; AOTAutograd compiles its backward.
    for backend, wrap in (("reference", lambda f: f), ("cpu", lambda f: torch.compile(f, fullgraph=True))):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        compiled = wrap(forward)
        results.append(run_steps(lambda m, compiled=compiled, backend=backend: compiled(m, backend), model, opt))
    (ref_losses, ref_params), (losses, params) = results
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_compiled_op_has_no_graph_break():
    torch._dynamo.reset()
    ce, kd, teacher, labels = make_inputs(4, 9)
    ce.requires_grad_()
    kd.requires_grad_()

    def fn(a, b):
        loss, ce_term, kd_term = dho_fast.fused_dual_head_loss(a, b, teacher, labels, return_terms=True, backend="cpu")
        return loss * 2 + ce_term

    explanation = torch._dynamo.explain(fn)(ce, kd)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
