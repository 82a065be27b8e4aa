"""DualHead: inference logits, the fused loss through the module, text initialisation, the blend, torch.compile.

The module's parts are checked against its nn.Linear heads applied by hand and the float64 oracle; the fused linear
op itself is tests/test_linear_loss.py's."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grad_within, assert_values_close, make_inputs, oracle_loss, run_steps

import dho_fast
from dho_fast import reference


def make_head(d=8, c=11, **kwargs):
    torch.manual_seed(0)
    return dho_fast.DualHead(d, c, **kwargs)


@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_forward_is_the_two_heads(kd_cosine):
    head = make_head(kd_cosine=kd_cosine, kd_logit_scale=7.0)
    features = torch.randn(5, 8)
    ce_logits, kd_logits = head(features)
    kd_features = F.normalize(features, dim=1) if kd_cosine else features
    torch.testing.assert_close(ce_logits, features @ head.ce_head.weight.T + head.ce_head.bias)
    torch.testing.assert_close(kd_logits, 7.0 * (kd_features @ head.kd_head.weight.T + head.kd_head.bias))


def heads_by_hand(head, features, params=None):
    """The module's heads applied by hand in float64, ``x W_ce^T + b_ce`` and ``s (g(x) W_kd^T + b_kd)``, with its
    parameters or ``params`` (ce weight, ce bias, kd weight, kd bias)."""
    x = features.double()
    kd_features = x / x.norm(dim=1, keepdim=True) if head.kd_cosine else x
    w_ce, b_ce, w_kd, b_kd = (p.double() for p in (params or head.parameters()))
    return x @ w_ce.T + b_ce, head.kd_logit_scale * (kd_features @ w_kd.T + b_kd)


@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_loss_is_the_dho_loss_of_the_heads(kd_cosine):
    head = make_head(kd_cosine=kd_cosine, kd_logit_scale=5.0)
    _, _, teacher, labels = make_inputs(13, 11, labelled="mixed")
    features = torch.randn(13, 8, requires_grad=True)
    kwargs = dict(temperature=3.0, ce_loss_weight=1.0, kd_loss_weight=0.25, label_smoothing=0.1)
    values = head.loss(features, teacher, labels, return_terms=True, chunk_size=4, **kwargs)
    params = [features, *head.parameters()]
    grads = torch.autograd.grad(values[0], params)

    params64 = [p.detach().double().requires_grad_() for p in params]
    want = oracle_loss(*heads_by_hand(head, params64[0], params64[1:]), teacher.double(), labels, **kwargs)
    want_grads = torch.autograd.grad(want[0], params64)
    for name, got, w in zip(("loss", "ce_term", "kd_term"), values, want, strict=True):
        assert_values_close(name, got.detach(), w, torch.float32, magnitude=w.detach().abs() + 1.0)
    names = ("features", "ce_head.weight", "ce_head.bias", "kd_head.weight", "kd_head.bias")
    for name, got, w in zip(names, grads, want_grads, strict=True):
        # This checks the module's wiring; tests/test_linear_loss.py bounds each element by its terms.
        assert_grad_within(name, got, w, torch.float32, magnitude=torch.full_like(w, float(w.abs().max())))


def test_init_from_text():
    head = make_head(kd_cosine=True, kd_logit_scale=100.0)
    text = F.normalize(torch.randn(11, 8), dim=1)
    head.init_from_text(text)
    for linear in (head.ce_head, head.kd_head):
        assert torch.equal(linear.weight, text) and not linear.bias.any()
    features = torch.randn(3, 8)
    torch.testing.assert_close(head(features)[1], 100.0 * F.normalize(features, dim=1) @ text.T)
    with pytest.raises(ValueError, match="text_embeddings"):
        head.init_from_text(torch.randn(11, 9))


@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_predict_blends_the_heads(kd_cosine):
    head = make_head(kd_cosine=kd_cosine, kd_logit_scale=3.0)
    features = torch.randn(6, 8)
    got = head.predict(features, 0.3, 1.5)
    ce_logits, kd_logits = heads_by_hand(head, features)
    want = 0.3 * torch.softmax(ce_logits, dim=1) + 0.7 * torch.softmax(kd_logits / 1.5, dim=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_rejects_bad_scale():
    with pytest.raises(ValueError, match="kd_logit_scale"):
        dho_fast.DualHead(4, 3, kd_logit_scale=0.0)


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU())
        self.head = dho_fast.DualHead(16, 9, kd_cosine=True, kd_logit_scale=10.0)


@pytest.mark.slow  # torch.compile
def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    _, _, teacher, labels = make_inputs(20, 9, labelled="mixed")
    images = torch.randn(20, 12)

    def fused_step(model):
        return model.head.loss(model.backbone(images), teacher, labels, chunk_size=8, backend="cpu")

    def eager_step(model):
        return reference.dual_head_loss(*model.head(model.backbone(images)), teacher, labels)[0]

    results = []
    # The fused step (backbone + fused loss) is compiled as one graph; AOTAutograd compiles its backward.
    for step in (eager_step, torch.compile(fused_step, fullgraph=True)):
        model = Student()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        results.append(run_steps(step, model, opt))
    (want_losses, want_params), (losses, params) = results
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params, want_params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # torch.compile
def test_loss_traces_without_graph_break():
    torch._dynamo.reset()
    head = make_head()
    _, _, teacher, labels = make_inputs(6, 11)
    features = torch.randn(6, 8, requires_grad=True)

    def fn(x):
        loss, ce_term, _ = head.loss(x, teacher, labels, return_terms=True, backend="cpu")
        return loss + ce_term

    explanation = torch._dynamo.explain(fn)(features)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
