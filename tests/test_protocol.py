"""The reference protocol's training and evaluation rules: epochs over L, the best validation epoch tested with its
alpha and beta, the shipped recipes, OpenAI weights only on QuickGELU architectures, the class text embeddings."""

import itertools
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trainer_fixtures import register_tiny_clip, run_settings

from dho_fast.train import checkpoint, cli
from dho_fast.train.build import build_data, build_run_student, build_teacher, teacher_template_spec
from dho_fast.train.config import DatasetName, TrainConfig, load_config
from dho_fast.train.datasets import DATASETS
from dho_fast.train.eval_checkpoint import evaluate_checkpoint
from dho_fast.train.splits import k_shot_indices, percent_split_indices
from dho_fast.train.teacher import class_text_embeddings, create_open_clip
from dho_fast.train.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FEWSHOT_DATASETS = (
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc",
    "food101",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
)


def best_val_settings(trees, logits_file, out, **changes):
    recipe = dict(max_steps=None, epochs=4, epoch_length="labelled", test_weights="best_val", lr=0.02)
    return run_settings(trees, out, teacher="logits", teacher_logits=logits_file, **{**recipe, **changes})


def _val_accuracies(history):
    return [(h["step"], h["acc_blend"]) for h in history if h["split"] == "val"]


def test_an_epoch_over_labelled_is_one_pass_over_l(trees, logits_file, tmp_path):
    config = TrainConfig(**best_val_settings(trees, logits_file, tmp_path, test_weights="last"))
    labelled = len(build_data(config).labelled)
    result = train(config)
    per_epoch = -(-labelled // config.labelled_batch_size)
    assert result.steps == 4 * per_epoch
    assert [h["step"] for h in result.history] == [per_epoch * e for e in (1, 2, 3, 4)]


def test_best_validation_epoch_is_tested_with_its_alpha_and_beta(trees, logits_file, tmp_path):
    # At this learning rate validation accuracy peaks before the last epoch.
    result = train(TrainConfig(**best_val_settings(trees, logits_file, tmp_path, lr=0.1)))
    accuracies = _val_accuracies(result.history)
    best_step, best_accuracy = max(accuracies, key=lambda pair: pair[1])  # max keeps the first maximum
    assert result.best_val_step == best_step < result.steps
    best = checkpoint.load(tmp_path / "best.pt")
    last = checkpoint.load(tmp_path / "last.pt")
    assert best["step"] == best_step and last["step"] == result.steps
    assert best["val"]["acc_blend"] == best_accuracy
    # The test of the run is the best epoch's weights with that epoch's alpha and beta.
    assert (result.test["alpha"], result.test["beta"]) == (best["alpha"], best["beta"]) == (result.alpha, result.beta)
    assert result.val == best["val"] == best["best_val"][1]  # the run reports the epoch it tested
    assert evaluate_checkpoint(tmp_path / "best.pt") == pytest.approx(result.test)
    assert last["test"] == result.test
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["weights_step"] for r in records if r["kind"] == "test"] == [best_step]


def test_a_tie_keeps_the_first_best_epoch(trees, logits_file, tmp_path):
    # A validation split of one image: its accuracy is 0 or 1, so epochs tie at the maximum.
    one = Path(trees["val"]) / "digit_0"
    single = tmp_path / "val_one" / "digit_0"
    single.mkdir(parents=True)
    shutil.copy(sorted(one.iterdir())[0], single)
    changes = dict(val_dir=str(tmp_path / "val_one"), output_dir=str(tmp_path / "run"))
    result = train(TrainConfig(**best_val_settings(trees, logits_file, tmp_path, **changes)))
    accuracies = _val_accuracies(result.history)
    steps_at_max = [step for step, acc in accuracies if acc == max(acc for _, acc in accuracies)]
    assert len(steps_at_max) > 1  # a tie to resolve
    assert result.best_val_step == steps_at_max[0] == checkpoint.load(tmp_path / "run" / "best.pt")["step"]


def test_best_val_needs_a_validation_split(trees, logits_file, tmp_path):
    with pytest.raises(ValueError, match="test_weights 'best_val' needs a validation split"):
        train(TrainConfig(**best_val_settings(trees, logits_file, tmp_path, val_dir=None, alpha=0.5, beta=0.5)))


@pytest.mark.parametrize(
    ("dataset", "student", "shots"),
    list(itertools.product(FEWSHOT_DATASETS, ("resnet18", "mobilenet_v2"), (1, 2, 4, 8, 16))),
)
def test_fewshot_recipes_load(dataset, student, shots):
    files = [CONFIGS / "fewshot" / f"{name}.yaml" for name in ("recipe", dataset, student)]
    config = load_config(files, {"shots": shots})
    assert (config.dataset, config.data_root, config.student, config.shots) == (dataset, "data", student, shots)
    assert config.student_pretrained.startswith(f"weights/{student}-")
    assert (config.teacher_arch, config.teacher_pretrained, config.interpolation) == (
        "RN50-quickgelu",
        "openai",
        "bilinear",
    )
    assert (config.epochs, config.epoch_length, config.test_weights) == (200, "labelled", "best_val")
    assert (config.lr, config.labelled_batch_size, config.unlabelled_batch_size) == (1e-3, 64, 64)
    assert (config.ce_loss_weight, config.kd_loss_weight, config.temperature, config.split_seed) == (0.5, 0.5, 2, None)
    assert config.teacher_templates is None  # the dataset's own prompt


def test_every_fewshot_dataset_has_a_recipe_file():
    names = {p.stem for p in (CONFIGS / "fewshot").glob("*.yaml")} - {"recipe", "resnet18", "mobilenet_v2"}
    assert names == set(FEWSHOT_DATASETS)


@pytest.mark.parametrize(("name", "percent"), [("imagenet_1pct_vitb16", 1), ("imagenet_10pct_vitb16", 10)])
def test_imagenet_recipes_use_the_reference_split_and_quickgelu(name, percent):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert (config.dataset, config.labelled_percent, config.split_seed) == ("imagenet", percent, None)
    assert config.student == "open_clip:ViT-B-16-quickgelu" and config.student_pretrained == "openai"
    assert (config.teacher_arch, config.teacher_pretrained) == ("ViT-H-14-378-quickgelu", "dfn5b")
    assert (config.lr, config.weight_decay, config.warmup_steps, config.lr_decay) == (5e-5, 0.05, 5000, "cosine")
    assert (config.alpha, config.beta, config.epochs, config.interpolation) == (0.5, 0.5, 32, "bicubic")
    assert teacher_template_spec(config) == "dho_imagenet"


def test_the_dataset_setting_takes_exactly_the_registered_datasets():
    assert set(typing.get_args(DatasetName)) == set(DATASETS) == {*FEWSHOT_DATASETS, "imagenet"}


def test_layered_configs_override_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train_dir: x\nshots: 2\nlr: 0.5\n")
    second.write_text("lr: 0.25\n")
    config = load_config([first, second], {"shots": 4})
    assert (config.train_dir, config.lr, config.shots) == ("x", 0.25, 4)


def test_teacher_templates_come_from_the_dataset_unless_set():
    base = dict(dataset="dtd", data_root="data", shots=1)
    assert teacher_template_spec(TrainConfig(**base)) == "{} texture."
    assert teacher_template_spec(TrainConfig(**base, teacher_templates="a {}.")) == "a {}."
    assert teacher_template_spec(TrainConfig(train_dir="x", shots=1)) == "a photo of a {}."


@pytest.mark.parametrize(("arch", "fix"), [("RN50", "RN50-quickgelu"), ("ViT-B-16", "ViT-B-16-quickgelu")])
def test_openai_weights_need_a_quickgelu_architecture(arch, fix):
    with pytest.raises(ValueError, match=f"trained with QuickGELU.*use '{fix}' instead"):
        create_open_clip(arch, "openai")


def test_random_and_local_weights_skip_the_quickgelu_check(tmp_path):
    name = register_tiny_clip(tmp_path)
    model, _, _ = create_open_clip(name, None)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    create_open_clip(name, str(weights))


@pytest.mark.parametrize("mean", ["normalized", "mean_of_normalized", "raw"])
def test_class_text_embeddings_follow_the_chosen_mean(tmp_path, mean):
    import open_clip

    name = register_tiny_clip(tmp_path)
    model, tokenizer, _ = create_open_clip(name, None)
    classnames, templates = ["cat", "dog", "fish"], ["a {}.", "a photo of a {}.", "{} art."]
    got = class_text_embeddings(model, tokenizer, classnames, templates, mean=mean, classes_per_batch=2)
    rows = []
    for c in classnames:
        prompts = model.encode_text(open_clip.tokenize([t.format(c) for t in templates])).float().detach()
        if mean == "raw":
            rows.append(prompts.mean(0))
        else:
            average = F.normalize(prompts, dim=-1).mean(0)
            rows.append(F.normalize(average, dim=0) if mean == "normalized" else average)
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)
    norms = got.norm(dim=1)
    assert torch.allclose(norms, torch.ones(3)) == (mean == "normalized")


@pytest.mark.parametrize(("teacher_mean", "student_mean"), [("mean_of_normalized", "raw"), ("raw", "normalized")])
def test_text_embedding_settings_reach_the_teacher_and_the_student_heads(tmp_path, teacher_mean, student_mean):
    name = register_tiny_clip(tmp_path)
    config = TrainConfig(
        train_dir="unused",
        shots=1,
        student=f"open_clip:{name}",
        teacher_arch=name,
        teacher_pretrained=None,
        teacher_templates="a {} square.",
        teacher_text_embeddings=teacher_mean,
        student_text_embeddings=student_mean,
    )
    classnames, cpu = ["blue", "red"], torch.device("cpu")
    torch.manual_seed(0)
    teacher = build_teacher(config, classnames, [], cpu)
    torch.manual_seed(0)
    student = build_run_student(config, classnames, cpu)
    torch.manual_seed(0)
    clip, tokenizer, _ = create_open_clip(name, None)  # the random weights both got
    templates = ["a {} square."]
    for got, mean in ((teacher.head.text_embeddings, teacher_mean), (student.head.kd_head.weight, student_mean)):
        expected = class_text_embeddings(clip, tokenizer, classnames, templates, mean=mean)
        torch.testing.assert_close(got, expected)


def test_fewshot_recipe_runs_on_a_dataset_tree(tmp_path, capsys):
    """The shipped recipe layered with a dataset file, on a synthetic dtd tree of digit images: K shots per class,
    epochs over L, the best validation epoch tested."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    names = ["zero_digit", "one_digit", "two_digit"]
    entries = {"train": [], "val": [], "test": []}
    for i, (image, label) in enumerate(zip(images[:150], digits.target[:150], strict=True)):
        relative = f"{names[label]}/{i:03d}.png"
        (tmp_path / "dtd" / "images" / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(tmp_path / "dtd" / "images" / relative)
        split = "train" if i < 90 else "val" if i < 120 else "test"
        entries[split].append([relative, int(label), names[label]])
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(entries))
    logits = tmp_path / "logits.pt"
    torch.save(torch.randn(90, 3, generator=torch.Generator().manual_seed(0)), logits)
    overrides = dict(
        data_root=str(tmp_path),
        shots=4,
        student="cnn",
        cnn_width=4,
        image_mode="L",
        student_size=8,
        teacher="logits",
        teacher_logits=str(logits),
        labelled_batch_size=4,
        unlabelled_batch_size=8,
        epochs=3,
        num_workers=0,
        progress=False,
        device="cpu",
        output_dir=str(tmp_path / "run"),
    )
    files = [CONFIGS / "fewshot" / f"{name}.yaml" for name in ("recipe", "dtd")]
    config = load_config(files, overrides)
    data = build_data(config)
    assert data.classnames == ["zero digit", "one digit", "two digit"]
    assert teacher_template_spec(config) == "{} texture."
    assert len(data.labelled) == 12 and len(data.unlabelled) == 90 - 12
    argv = ["train", *(f"--config={f}" for f in files)]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag if value is True else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    assert cli.main(argv) == 0  # the same run through the command line, its --config files layered
    last = checkpoint.load(tmp_path / "run" / "last.pt")
    best_step = checkpoint.load(tmp_path / "run" / "best.pt")["step"]
    assert last["step"] == 3 * 3 and best_step in (3, 6, 9)  # 12 labelled images, batches of 4
    assert set(last["test"]) == {"acc_ce", "acc_kd", "acc_blend", "alpha", "beta"}
    printed = capsys.readouterr().out
    assert f"validation (the best validation epoch, step {best_step})" in printed
    assert f"test (the best validation epoch, step {best_step})" in printed and "tested weights: best.pt" in printed


@pytest.mark.parametrize(
    ("rule", "seed"), [(dict(labelled_percent=10), None), (dict(labelled_percent=10), 5), (dict(shots=3), None)]
)
def test_the_trainer_uses_the_reference_rules_with_their_seeds(trees, rule, seed):
    config = TrainConfig(train_dir=trees["train"], split_seed=seed, **rule)
    data = build_data(config)
    labels = data.splits.train_labels()
    if "shots" in rule:
        expected = k_shot_indices(labels, 3, 1 if seed is None else seed)
    else:
        expected = percent_split_indices(labels, 10, 13 if seed is None else seed)
    np.testing.assert_array_equal(data.labelled, expected)
    np.testing.assert_array_equal(data.unlabelled, np.setdiff1d(np.arange(len(labels)), expected))
