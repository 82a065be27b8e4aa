"""CLAP on a real tiny random-weight open_clip model and PNG digits: W0, the head, the constraint weights, the fit,
and the logits file the active loop trains its student from."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from trainer_fixtures import register_tiny_clip

from dho_fast.train.clap import (
    ClapHead,
    clap_loss,
    class_adaptive_weights,
    fit_clap,
    mean_text_embeddings,
    write_teacher_logits,
)
from dho_fast.train.data import Sample, scan_image_folder
from dho_fast.train.teacher import ClipTeacher, LogitsTeacher, ZeroShotHead, create_open_clip

# Five classes, the labelled images only of the first four: the fifth has no a_c evidence.
CLASSES = ["zero", "one", "two", "three", "four"]
TEMPLATES = ["a photo of a {}.", "a blurry {}.", "the number {}"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    name = register_tiny_clip(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)  # one fixed random model, so the fits below are the same every run
    return create_open_clip(name, None)


@pytest.fixture(scope="module")
def text_means(tiny_clip):
    model, tokenizer, _ = tiny_clip
    return mean_text_embeddings(model, tokenizer, CLASSES, TEMPLATES)


@pytest.fixture(scope="module")
def labelled(trees):
    samples, _ = scan_image_folder(trees["train"])
    return [s for c in range(4) for s in [x for x in samples if x.label == c][:3]]


def clip_images(samples, preprocess) -> torch.Tensor:
    """The images as open_clip's own evaluation transform prepares them (resize the shorter side, centre crop)."""
    transform = open_clip.image_transform(
        preprocess["size"], is_train=False, mean=preprocess["mean"], std=preprocess["std"], interpolation="bicubic"
    )
    return torch.stack([transform(Image.open(s.path).convert("RGB")) for s in samples])


def clip_features(model, samples, preprocess) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_image(clip_images(samples, preprocess)), dim=-1)


def test_w0_is_the_mean_of_the_raw_prompt_embeddings(tiny_clip, text_means):
    model, tokenizer, _ = tiny_clip
    assert text_means.shape == (5, 16) and text_means.dtype == torch.float32
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            prompts = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            torch.testing.assert_close(text_means[c], prompts.mean(dim=0))
    assert not torch.allclose(text_means.norm(dim=1), torch.ones(5))  # unnormalised


def test_head_logits_are_the_formula():
    means = torch.randn(5, 16) * 3
    head = ClapHead(means, 14.5)
    with torch.no_grad():
        head.prototypes.add_(torch.randn(5, 16))
    features = torch.randn(7, 16) * 2
    p, f = head.prototypes.detach().double(), features.double()
    expected = 14.5 * (f / f.norm(dim=1, keepdim=True)) @ (p / p.norm(dim=1, keepdim=True)).T
    logits = head(features)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert head.prototypes.grad is not None and not head.text_means.requires_grad
    torch.testing.assert_close(head.text_means, means)


def test_head_at_w0_predicts_as_the_zero_shot_head(tiny_clip, text_means):
    model, _, preprocess = tiny_clip
    scale = float(model.logit_scale.detach().exp())
    teacher = ClipTeacher(model, ClapHead(text_means, scale), preprocess)
    zero_shot = ClipTeacher(model, ZeroShotHead(F.normalize(text_means, dim=-1)), preprocess)
    images = torch.randn(32, 3, 16, 16)
    clap, zs = teacher(images), zero_shot(images)
    torch.testing.assert_close(clap / scale, zs / 100)
    assert torch.equal(clap.argmax(dim=1), zs.argmax(dim=1))


def test_penalty_and_loss_are_the_formula():
    means, weights = torch.randn(4, 8), torch.rand(4)
    head = ClapHead(means, 20.0, weights)
    assert head.penalty().item() == 0.0
    with torch.no_grad():
        head.prototypes.add_(torch.randn(4, 8))
    p, w0 = head.prototypes.detach().double(), means.double()
    penalty = sum(weights[c].item() * sum((p[c, d] - w0[c, d]).item() ** 2 for d in range(8)) for c in range(4)) / 4
    assert math.isclose(head.penalty().item(), penalty, rel_tol=1e-5)
    features, labels = torch.randn(6, 8), torch.randint(0, 4, (6,))
    z = head(features).detach().double()
    ce = sum(torch.logsumexp(z[i], 0).item() - z[i, labels[i]].item() for i in range(6)) / 6
    assert math.isclose(clap_loss(head, features, labels).item(), ce + penalty, rel_tol=1e-5)


def test_class_adaptive_weights_are_per_class_mean_probabilities():
    logits, labels = torch.randn(9, 4) * 3, torch.tensor([0, 2, 2, 0, 1, 2, 0, 0, 1])  # class 3 has no row
    probs = logits.double().softmax(dim=1)
    expected = [
        sum(probs[i, c].item() for i in range(9) if labels[i] == c) / max(1, sum(1 for y in labels if y == c))
        for c in range(4)
    ]
    torch.testing.assert_close(class_adaptive_weights(logits, labels), torch.tensor(expected, dtype=torch.float32))


def test_fit_learns_is_seeded_and_weighs_classes_by_zero_shot_accuracy(tiny_clip, text_means, labelled):
    model, _, preprocess = tiny_clip
    fit = dict(epochs=16, batch_size=12, lr=0.1)
    head = fit_clap(model, preprocess, text_means, labelled, seed=3, **fit)
    assert not head.prototypes.requires_grad
    assert head.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert torch.equal(head.prototypes, fit_clap(model, preprocess, text_means, labelled, seed=3, **fit).prototypes)
    assert not torch.equal(head.prototypes, fit_clap(model, preprocess, text_means, labelled, seed=4, **fit).prototypes)

    features = clip_features(model, labelled, preprocess)
    labels = torch.tensor([s.label for s in labelled])
    zero_shot = (100 * features.double() @ F.normalize(text_means.double(), dim=-1).T).softmax(dim=1)
    own = zero_shot[torch.arange(len(labels)), labels]
    expected = torch.stack([own[labels == c].mean() for c in range(4)] + [own.new_zeros(())]).float()
    torch.testing.assert_close(head.constraint_weights, expected, rtol=1e-4, atol=1e-6)

    start = F.cross_entropy(ClapHead(text_means, head.logit_scale)(features), labels)
    assert F.cross_entropy(head(features), labels) < start - 0.02


def test_fit_with_fewer_rows_than_a_batch_takes_one_step(tiny_clip, text_means, labelled):
    model, _, preprocess = tiny_clip
    head = fit_clap(model, preprocess, text_means, labelled[:2], epochs=1, batch_size=64)
    assert not torch.equal(head.prototypes, text_means)  # one step at the full rate (no warm-up step in 1)


def test_teacher_logits_round_trip_through_the_logits_teacher(tiny_clip, text_means, labelled, tmp_path):
    model, _, preprocess = tiny_clip
    head = ClapHead(text_means, 14.0)
    with torch.no_grad():
        head.prototypes.add_(torch.randn(5, 16))
    teacher = ClipTeacher(model, head, preprocess)
    path = tmp_path / "teacher" / "round_1.pt"
    path.parent.mkdir()
    path.write_bytes(b"an older file, replaced whole")
    logits = write_teacher_logits(teacher, labelled, path, batch_size=5)
    assert [p.name for p in path.parent.iterdir()] == ["round_1.pt"]  # no temporary file left beside it
    loaded = LogitsTeacher.from_file(path, len(labelled), 5)
    with torch.no_grad():
        expected = head(clip_features(model, labelled, preprocess))
    torch.testing.assert_close(loaded.logits, expected)
    torch.testing.assert_close(loaded.logits, logits, rtol=0, atol=0)


def test_logits_the_reader_would_refuse_are_not_written(tiny_clip, labelled, tmp_path):
    model, _, preprocess = tiny_clip
    text = torch.full((5, 16), float("nan"))
    path = tmp_path / "logits.pt"
    with pytest.raises(ValueError, match=f"the teacher logits for {path} row 0 column 0 is nan"):
        write_teacher_logits(ClipTeacher(model, ZeroShotHead(text), preprocess), labelled, path)
    assert not path.exists()


MEANS = torch.randn(3, 4)
BAD_HEADS = {
    "1-d text_means": (dict(text_means=torch.randn(4)), ValueError, "text_means must be a float tensor (C, D)"),
    "empty text_means": (dict(text_means=torch.randn(0, 4)), ValueError, "with C, D >= 1, got shape (0, 4)"),
    "int text_means": (dict(text_means=torch.ones(3, 4, dtype=torch.int64)), TypeError, "got a torch.int64 tensor"),
    "nan text_means": (dict(text_means=MEANS.clone().fill_(float("nan"))), ValueError, "text_means must be finite"),
    "zero row": (dict(text_means=MEANS * torch.tensor([[1.0], [0.0], [1.0]])), ValueError, "text_means row 1 is zero"),
    "logit_scale 0": (dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0, got 0.0"),
    "logit_scale nan": (dict(logit_scale=float("nan")), ValueError, "logit_scale must be finite and > 0, got nan"),
    "logit_scale tensor": (dict(logit_scale=torch.tensor(1.0)), TypeError, "logit_scale must be a float, got a Tensor"),
    "weights shape": (dict(constraint_weights=torch.rand(4)), ValueError, "constraint_weights must have shape (C,)"),
    "weights int": (dict(constraint_weights=torch.ones(3, dtype=torch.int64)), TypeError, "constraint_weights must"),
    "weights < 0": (dict(constraint_weights=-torch.rand(3)), ValueError, "constraint_weights must be finite and >= 0"),
}


@pytest.mark.parametrize("case", BAD_HEADS)
def test_bad_head_arguments_are_named(case):
    changes, error, words = BAD_HEADS[case]
    args = dict(text_means=MEANS, logit_scale=10.0, constraint_weights=None) | changes
    with pytest.raises(error) as info:
        ClapHead(**args)
    assert type(info.value) is error and words in str(info.value)


def test_bad_fit_and_write_arguments_are_named(tiny_clip, text_means, labelled, tmp_path):
    model, _, preprocess = tiny_clip
    with pytest.raises(ValueError, match="samples must hold at least one labelled image"):
        fit_clap(model, preprocess, text_means, [])
    stray = [*labelled[:2], Sample(labelled[0].path, 5)]
    with pytest.raises(ValueError, match=r"samples\[2\] \(.*\) has label 5, outside the 5 classes of text_means"):
        fit_clap(model, preprocess, text_means, stray)
    with pytest.raises(ValueError, match="epochs must be an int64 >= 1, got 0"):
        fit_clap(model, preprocess, text_means, labelled, epochs=0)
    with pytest.raises(TypeError, match="batch_size must be an int >= 1, got float"):
        fit_clap(model, preprocess, text_means, labelled, batch_size=8.0)
    with pytest.raises(TypeError, match="text_means must be a float tensor"):
        fit_clap(model, preprocess, text_means.long(), labelled)
    teacher = ClipTeacher(model, ClapHead(text_means, 10.0), preprocess)
    with pytest.raises(ValueError, match="path must end in .pt or .pth"):
        write_teacher_logits(teacher, labelled, tmp_path / "logits.npy")
    with pytest.raises(ValueError, match="samples must hold at least one image"):
        write_teacher_logits(teacher, [], tmp_path / "logits.pt")
    with pytest.raises(TypeError, match="teacher must be a ClipTeacher"):
        write_teacher_logits(LogitsTeacher(torch.randn(12, 5)), labelled, tmp_path / "logits.pt")
    with pytest.raises(TypeError, match="labels int64"):
        class_adaptive_weights(torch.randn(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels \(N,\), got shapes \(3, 2\) and \(4,\)"):
        class_adaptive_weights(torch.randn(3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got 0..2"):
        class_adaptive_weights(torch.randn(3, 2), torch.tensor([0, 2, 1]))
