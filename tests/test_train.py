"""The trainer end to end on real PNG images: methods, checkpoints, CLI, configs, open_clip teacher and student,
gradient accumulation and mixed precision."""

import json

import pytest
import torch
import yaml
from PIL import Image
from trainer_fixtures import (
    assert_same_weights,
    register_tiny_clip,
    run_settings,
    tiny_clip_config,
)

from dho_fast.train import checkpoint, cli
from dho_fast.train.build import build_data, build_run_student, eval_dataset
from dho_fast.train.config import TrainConfig
from dho_fast.train.students import SmallConvNet, build_student
from dho_fast.train.teacher import class_text_embeddings, create_open_clip, prompt_templates
from dho_fast.train.trainer import train


def settings(trees, logits_file, out, **changes):
    return run_settings(trees, out, **{"teacher": "logits", "teacher_logits": logits_file, **changes})


@pytest.mark.parametrize("method", ["dho", "kd", "ce"])
def test_method_trains_checkpoints_and_evaluates(trees, logits_file, tmp_path, method):
    result = train(TrainConfig(**settings(trees, logits_file, tmp_path, method=method)))
    assert result.steps == 4 and result.checkpoint == tmp_path / "last.pt"
    state = checkpoint.load(result.checkpoint)
    assert state["step"] == 4 and state["config"]["method"] == method
    assert state["test"] == result.test and state["val"] == result.val
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 2 and "eval" in kinds and "test" in kinds and kinds[-1] == "checkpoint"
    assert (tmp_path / "train.csv").read_text().startswith("step,epoch,lr,loss,ce,kd,images_per_s")
    if method == "dho":
        assert set(result.test) == {"acc_ce", "acc_kd", "acc_blend", "alpha", "beta"}
        assert (
            (state["alpha"], state["beta"]) == (result.alpha, result.beta) == (result.val["alpha"], result.val["beta"])
        )
        assert (result.test["alpha"], result.test["beta"]) == (result.alpha, result.beta)  # chosen on val, used on test
    else:
        assert set(result.test) == {"acc"} and result.alpha is None
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(result.checkpoint), "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == pytest.approx(result.test)


def test_fixed_alpha_beta_workers_and_tensorboard(trees, logits_file, tmp_path):
    changes = dict(val_dir=None, alpha=0.5, beta=0.5, max_steps=2, num_workers=2, tensorboard=True)
    result = train(TrainConfig(**settings(trees, logits_file, tmp_path, **changes)))
    assert result.val is None and (result.test["alpha"], result.test["beta"]) == (0.5, 0.5)
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="validation split"):
        train(TrainConfig(**settings(trees, logits_file, tmp_path / "b", val_dir=None)))


def test_cli_train_from_yaml_with_flag_overrides(trees, logits_file, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings(trees, logits_file, tmp_path / "run", max_steps=50)))
    assert cli.main(["train", "--config", str(path), "--max-steps", "2", "--no-hflip", "--crop-scale", "0.8", "1"]) == 0
    saved = checkpoint.load(tmp_path / "run" / "last.pt")["config"]
    assert saved["max_steps"] == 2 and saved["hflip"] is False and saved["crop_scale"] == [0.8, 1.0]
    assert "acc_blend" in capsys.readouterr().out
    assert cli.main(["train", "--config", str(path), "--method", "both"]) == 2
    assert "method must be one of ('dho', 'kd', 'ce'), got 'both'" in capsys.readouterr().err


def test_resume_guards(trees, logits_file, tmp_path):
    base = settings(trees, logits_file, tmp_path, max_steps=2)
    with pytest.raises(FileNotFoundError, match="resume is set but"):
        train(TrainConfig(**base, resume=True))
    train(TrainConfig(**base))
    with pytest.raises(FileExistsError, match="pass resume"):
        train(TrainConfig(**base))
    with pytest.raises(ValueError, match="cannot resume: the settings \\['lr'\\] differ"):
        train(TrainConfig(**{**base, "lr": 0.5}, resume=True))
    # A checkpoint of an earlier version lacks the settings added since: named, not compared as None.
    state = checkpoint.load(tmp_path / "last.pt")
    del state["config"]["epoch_length"]
    checkpoint.save_atomic(state, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="earlier version of dho_fast, without the settings \\['epoch_length'\\]"):
        train(TrainConfig(**base, resume=True))


def test_open_clip_teacher_and_student_end_to_end(tmp_path):
    """A tiny random-weight open_clip model is a real teacher (text prompts, image views) and a CLIP student whose
    heads start from its own text embeddings, with METHOD.md's cosine KD head."""
    name = register_tiny_clip(tmp_path)
    rgb = {}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for i in range(n):
            folder = tmp_path / split / ("red" if i % 2 else "blue")
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 24), (200, 30, 30) if i % 2 else (30, 30, 200)).save(folder / f"{i}.png")
        rgb[split] = str(tmp_path / split)
    config = TrainConfig(
        **run_settings(
            rgb,
            tmp_path / "run",
            image_mode="RGB",
            student=f"open_clip:{name}",
            student_size=16,
            labelled_fraction=0.25,
            labelled_batch_size=4,
            unlabelled_batch_size=8,
            max_steps=2,
            teacher="open_clip",
            teacher_arch=name,
            teacher_pretrained=None,
            open_clip_config=tiny_clip_config(tmp_path),
            teacher_templates="a {} square.",
        ),
    )
    torch.manual_seed(0)
    student = build_run_student(config, ["blue", "red"], torch.device("cpu"))
    assert student.head.kd_cosine and student.head.kd_logit_scale == 100.0
    torch.manual_seed(0)
    clip, tokenizer, _ = create_open_clip(name, None)  # the same random weights the student got
    text = class_text_embeddings(clip, tokenizer, ["blue", "red"], prompt_templates("a {} square."))
    torch.testing.assert_close(student.head.kd_head.weight, text)
    result = train(config)
    assert result.steps == 2
    # The reported test accuracies against an independent evaluation of the saved student: its backbone's features
    # through both heads' weights and the blend written out in float64, one image at a time.
    student.load_state_dict(checkpoint.load(result.checkpoint)["model"])
    student.eval()
    dataset = eval_dataset(config, build_data(config).splits.test, student)
    hits = {"acc_ce": 0, "acc_kd": 0, "acc_blend": 0}
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            image, label = item["student"], item["label"]
            f = student.backbone(image.unsqueeze(0)).double()[0]
            head = student.head
            z_ce = head.ce_head.weight.double() @ f + head.ce_head.bias.double()
            z_kd = head.kd_logit_scale * (head.kd_head.weight.double() @ (f / f.norm()) + head.kd_head.bias.double())
            blend = result.alpha * z_ce.softmax(0) + (1 - result.alpha) * (z_kd / result.beta).softmax(0)
            for name, z in (("acc_ce", z_ce), ("acc_kd", z_kd), ("acc_blend", blend)):
                hits[name] += int(z.argmax()) == label
    for name, count in hits.items():
        assert result.test[name] == pytest.approx(count / len(dataset)), name


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("mobilenet_v2", 1280), ("timm:resnet10t", 512)])
def test_students_load_local_weights(tmp_path, name, dim):
    torch.manual_seed(0)
    source, _ = build_student(name, 5, "kd")
    path = tmp_path / "weights.pt"
    backbone = source.backbone.state_dict()
    if name.startswith("timm:"):
        torch.save(backbone, path)  # timm loads its own checkpoint layout
    else:
        torch.save({f"x.{k}": v for k, v in backbone.items()}, path)
        with pytest.raises(ValueError, match="does not match the architecture"):
            build_student(name, 5, "kd", pretrained=str(path))
        torch.save(backbone, path)  # a torchvision file without its classifier
    torch.manual_seed(1)
    student, _ = build_student(name, 5, "dho", pretrained=str(path))
    for key, value in backbone.items():
        torch.testing.assert_close(student.backbone.state_dict()[key], value, msg=key)
    ce, kd = student.eval().logits(torch.randn(2, 3, 32, 32))
    assert ce.shape == kd.shape == (2, 5) and student.head.ce_head.in_features == dim


def test_cnn_student_runs_channels_last_with_the_features_of_channels_first():
    torch.manual_seed(0)
    net = SmallConvNet(1, 4)
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(5, 1, 28, 28)
    features = net(images)
    net.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(features, net.features(images), rtol=1e-5, atol=1e-6)


def tiny_clip_student_run(trees, logits_file, out, name, **changes):
    return settings(
        trees,
        logits_file,
        out,
        image_mode="RGB",
        student=f"open_clip:{name}",
        student_size=16,
        max_steps=3,
        lr=1e-3,
        **changes,
    )


def test_gradient_accumulation_matches_one_big_batch(trees, logits_file, tmp_path):
    name = register_tiny_clip(tmp_path)  # LayerNorm only: micro-batches see the same statistics as the batch
    states = []
    for accum in (1, 2):
        run = tiny_clip_student_run(trees, logits_file, tmp_path / f"a{accum}", name, accumulation_steps=accum)
        states.append(checkpoint.load(train(TrainConfig(**run)).checkpoint)["model"])
    assert_same_weights(*states, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(trees, logits_file, tmp_path, precision):
    result = train(TrainConfig(**settings(trees, logits_file, tmp_path, precision=precision, max_steps=2)))
    state = checkpoint.load(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert (state["scaler"] != {}) == (precision == "fp16")  # GradScaler only where fp16 needs it
