"""The gradient-conflict measure against gradients computed by plain autograd on plain-PyTorch loss terms, alone and
as the trainer logs it; logging it changes nothing the run computes."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainer_fixtures import run_settings

from dho_fast.train import checkpoint
from dho_fast.train.config import TrainConfig
from dho_fast.train.distributed import init_distributed
from dho_fast.train.gradient_conflict import term_gradient_cosines
from dho_fast.train.students import build_student
from dho_fast.train.trainer import _Trainer, train

IGNORE = -100
T = 2.0


def plain_terms(student, images, teacher, labels):
    """``(ce_term, kd_term, features)`` written out in plain PyTorch: METHOD.md's CE and split KD terms."""
    features = student.backbone(images)
    if student.method == "dho":
        head = student.head
        g = F.normalize(features) if head.kd_cosine else features
        z_ce = F.linear(features, head.ce_head.weight, head.ce_head.bias)
        z_kd = head.kd_logit_scale * F.linear(g, head.kd_head.weight, head.kd_head.bias)
    else:
        z_ce = z_kd = student.head(features)
    labelled = labels != IGNORE
    ce = F.cross_entropy(z_ce[labelled], labels[labelled])
    p = F.softmax(teacher / T, 1)
    kl = (p * (p.log() - F.log_softmax(z_kd / T, 1))).sum(1)
    kd = T * T * (kl[labelled].mean() + kl[~labelled].mean())
    return ce, kd, features


def plain_cosines(student, images, teacher, labels) -> tuple[float, float]:
    """Each term's gradient by its own autograd call, straight from the term to the features and to the backbone's
    parameters; their cosines in float64."""
    ce, kd, features = plain_terms(student, images, teacher, labels)
    params = list(student.backbone.parameters())
    grads = [torch.autograd.grad(term, [features, *params], retain_graph=True) for term in (ce, kd)]

    def cos(a, b):
        a, b = torch.cat([t.double().flatten() for t in a]), torch.cat([t.double().flatten() for t in b])
        return float(a @ b / (a.norm() * b.norm()))

    return cos(grads[0][:1], grads[1][:1]), cos(grads[0][1:], grads[1][1:])


def batch(num_rows=24, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_rows, 1, 8, 8, generator=g)
    teacher = 3 * torch.randn(num_rows, num_classes, generator=g)
    labels = torch.randint(0, num_classes, (num_rows,), generator=g)
    labels[num_rows // 3 :] = IGNORE
    return images, teacher, labels


@pytest.mark.parametrize(("method", "kd_cosine"), [("dho", False), ("dho", True), ("kd", False)])
def test_cosines_match_plain_autograd(method, kd_cosine):
    torch.manual_seed(0)
    student, _ = build_student("cnn", 5, method, in_channels=1, cnn_width=4, kd_cosine=kd_cosine)
    images, teacher, labels = batch()
    reference = plain_cosines(student, images, teacher, labels)
    _, ce, kd, features = student(
        images, teacher, labels, return_features=True, temperature=T, ignore_index=IGNORE
    )  # fmt: skip
    cos_features, cos_backbone = term_gradient_cosines(ce, kd, features, student.backbone, backbone_grad_scale=1024.0)
    assert cos_features.dtype == cos_backbone.dtype == torch.float64
    assert float(cos_features) == pytest.approx(reference[0], abs=1e-5)
    assert float(cos_backbone) == pytest.approx(reference[1], abs=1e-5)
    # Both are real measurements, not a constant: they differ from each other and lie strictly inside (-1, 1).
    assert all(-1 < v < 1 for v in reference) and abs(reference[0] - reference[1]) > 1e-3
    only_features = term_gradient_cosines(ce, kd, features)
    assert only_features[1] is None and float(only_features[0]) == float(cos_features)


def test_undefined_without_labelled_rows():
    student, _ = build_student("cnn", 5, "dho", in_channels=1, cnn_width=4)
    images, teacher, labels = batch()
    labels[:] = IGNORE
    _, ce, kd, features = student(images, teacher, labels, return_features=True, ignore_index=IGNORE)
    cos_features, cos_backbone = term_gradient_cosines(ce, kd, features, student.backbone)
    assert math.isnan(cos_features) and math.isnan(cos_backbone)


def _train_records(out: Path) -> list[dict]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("method", ["dho", "kd"])
def test_trainer_logs_the_first_steps_conflict(trees, logits_file, tmp_path, method):
    """The value logged at step 1 is the plain-autograd cosine of the first batch at the initial weights."""
    settings = run_settings(
        trees, tmp_path / "run", method=method, teacher="logits", teacher_logits=logits_file, log_every=1,
        max_steps=3, log_gradient_conflict=True,
    )  # fmt: skip
    trainer = _Trainer(TrainConfig(**settings), init_distributed("cpu"))
    first = next(iter(trainer._loader()))
    initial = copy.deepcopy(trainer.student)
    teacher = trainer.teacher(None, first["index"])
    reference = plain_cosines(initial, first["student"], teacher, first["label"])
    trainer.run()
    records = _train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["grad_cos_features"] == pytest.approx(reference[0], abs=1e-5)
    assert records[0]["grad_cos_backbone"] == pytest.approx(reference[1], abs=1e-5)
    assert all(-1 <= r[key] <= 1 for r in records for key in ("grad_cos_features", "grad_cos_backbone"))


def test_logging_changes_nothing_the_run_computes(trees, logits_file, tmp_path):
    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        settings = run_settings(
            trees, out, teacher="logits", teacher_logits=logits_file, log_gradient_conflict=flag, log_every=2
        )
        train(TrainConfig(**settings))
        runs[flag] = checkpoint.load(out / "last.pt")
        keys = {k for r in _train_records(out) for k in r}
        assert ("grad_cos_features" in keys) == ("grad_cos_backbone" in keys) == flag
    for key, value in runs[False]["model"].items():
        assert torch.equal(value, runs[True]["model"][key]), key
    assert runs[False]["val"] == runs[True]["val"]
