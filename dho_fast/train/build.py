"""Builds a run's pieces from its :class:`~dho_fast.train.config.TrainConfig`: splits, datasets, teacher, student."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dho_fast.train.checkpoint import load_file
from dho_fast.train.config import TrainConfig
from dho_fast.train.data import (
    DatasetSplits,
    ImageDataset,
    Sample,
    complement,
    load_classnames,
    load_coop_splits,
    load_image_folder_splits,
    read_labelled_indices,
)
from dho_fast.train.datasets import dataset_templates, load_dataset
from dho_fast.train.splits import (
    K_SHOT_SEED,
    PERCENT_SEED,
    class_balanced_indices,
    k_shot_indices,
    percent_split_indices,
)
from dho_fast.train.students import Student, build_student
from dho_fast.train.teacher import (
    ClipTeacher,
    LogitsTeacher,
    TipAdapterHead,
    ZeroShotHead,
    class_text_embeddings,
    create_open_clip,
    prompt_templates,
)
from dho_fast.train.teacher_cache import TeacherCache
from dho_fast.train.transforms import PairedTransform


@dataclass
class RunData:
    """The splits, the prompt class names, and the labelled / unlabelled int64 indices into ``splits.train``."""

    splits: DatasetSplits
    classnames: list[str]
    labelled: np.ndarray
    unlabelled: np.ndarray


def load_splits(config: TrainConfig) -> DatasetSplits:
    """The train, val and test splits of ``config``'s named dataset, ImageFolder trees or CoOp split json."""
    if config.dataset is not None:
        return load_dataset(config.dataset, config.data_root)
    if config.data_format == "imagefolder":
        return load_image_folder_splits(config.train_dir, config.val_dir, config.test_dir)
    return load_coop_splits(config.split_json, config.image_root)


def build_data(config: TrainConfig) -> RunData:
    """Reads the splits and selects the labelled set (the rest of the train pool is unlabelled)."""
    splits = load_splits(config)
    labels = splits.train_labels()
    if config.labelled_percent is not None:
        labelled = percent_split_indices(labels, config.labelled_percent, _split_seed(config, PERCENT_SEED))
    elif config.shots is not None:
        labelled = k_shot_indices(labels, config.shots, _split_seed(config, K_SHOT_SEED))
    elif config.labelled_indices is not None:
        labelled = read_labelled_indices(config.labelled_indices, len(labels))
    else:
        # Seed 1 by default: the split_seed of earlier versions, so that their class-balanced sets stay the same.
        labelled = class_balanced_indices(
            labels, fraction=config.labelled_fraction, num_labelled=config.num_labelled, seed=_split_seed(config, 1)
        )
    classnames = load_classnames(config.classnames, splits.classnames)
    return RunData(splits, classnames, labelled, complement(labelled, len(labels)))


def _split_seed(config: TrainConfig, reference_seed: int) -> int:
    return reference_seed if config.split_seed is None else config.split_seed


def teacher_template_spec(config: TrainConfig) -> str:
    """The teacher's prompt templates: ``teacher_templates``, else the named dataset's (METHOD.md), else the one
    ``"a photo of a {}."``; a spec of :func:`~dho_fast.train.teacher.prompt_templates`."""
    if config.teacher_templates is not None:
        return config.teacher_templates
    return dataset_templates(config.dataset) if config.dataset is not None else "a photo of a {}."


def teacher_precision(config: TrainConfig, device: torch.device) -> str:
    """open_clip precision of the teacher: "auto" is fp16 on GPU (as the reference runs it), fp32 on CPU."""
    if config.teacher_precision != "auto":
        return config.teacher_precision
    return "fp16" if device.type == "cuda" else "fp32"


def build_teacher(
    config: TrainConfig, classnames: Sequence[str], train_samples: Sequence[Sample], device: torch.device
) -> nn.Module | TeacherCache:
    """The teacher of ``config.teacher``: an open_clip zero-shot model with class text embeddings from the prompt
    ensemble, a Tip-Adapter-F checkpoint on an open_clip image encoder, a file of precomputed logits, or a store of
    soft labels (checked against ``train_samples``, the train pool)."""
    num_train = len(train_samples)
    if config.teacher == "cache":
        return TeacherCache(
            config.teacher_cache, train_samples, len(classnames), temperature=config.temperature,
            crop=(tuple(config.crop_scale), config.hflip), image_mode=config.image_mode,
            interpolation=config.interpolation,
        )  # fmt: skip
    if config.teacher == "logits":
        return LogitsTeacher.from_file(config.teacher_logits, num_train, len(classnames)).to(device)
    model, tokenizer, preprocess, input_dtype = build_teacher_model(config, device)
    if config.teacher == "open_clip":
        templates = prompt_templates(teacher_template_spec(config))
        embeddings = class_text_embeddings(
            model, tokenizer, classnames, templates, device=device, mean=config.teacher_text_embeddings
        )
        head = ZeroShotHead(embeddings)
    else:
        path = config.tip_adapter_checkpoint
        state = load_file(path, f"tip_adapter_checkpoint {path}")
        head = TipAdapterHead(state)
        if head.clip_weights.shape[1] != len(classnames):
            raise ValueError(
                f"tip_adapter_checkpoint has {head.clip_weights.shape[1]} classes, the dataset {len(classnames)}"
            )
    return ClipTeacher(model, head, preprocess, input_dtype).to(device)


def build_teacher_model(config: TrainConfig, device: torch.device) -> tuple[nn.Module, Callable, dict, torch.dtype]:
    """The open_clip model of the teacher settings (``teacher_arch``, ``teacher_pretrained``, ``teacher_precision``,
    ``open_clip_config``) on ``device``: the model, its tokenizer, its preprocessing settings and the dtype its
    image encoder takes."""
    precision = teacher_precision(config, device)
    model, tokenizer, preprocess = create_open_clip(
        config.teacher_arch,
        config.teacher_pretrained,
        device=device,
        precision=precision,
        model_config=config.open_clip_config,
    )
    import open_clip

    return model, tokenizer, preprocess, open_clip.get_input_dtype(precision) or torch.float32


def build_run_student(
    config: TrainConfig, classnames: Sequence[str], device: torch.device, *, init_heads: bool = True
) -> Student:
    """The student of ``config`` with fresh heads; with ``init_heads`` an open_clip student's heads start from its
    own class text embeddings (prompts ``student_templates``, else ``teacher_templates``), as METHOD.md's ViT
    recipe does (a student about to load a checkpoint skips that)."""
    student, clip_model = build_student(
        config.student,
        len(classnames),
        config.method,
        pretrained=config.student_pretrained,
        in_channels=1 if config.image_mode == "L" else 3,
        cnn_width=config.cnn_width,
        kd_cosine=config.kd_cosine,
        kd_logit_scale=config.kd_logit_scale,
        open_clip_config=config.open_clip_config,
        device=device,
    )
    if config.student_mean is not None:
        student.mean, student.std = tuple(config.student_mean), tuple(config.student_std)
    if clip_model is not None and init_heads:
        import open_clip

        tokenizer = open_clip.get_tokenizer(config.student.removeprefix("open_clip:"))
        templates = prompt_templates(config.student_templates or teacher_template_spec(config))
        embeddings = class_text_embeddings(
            clip_model, tokenizer, classnames, templates, device=device, mean=config.student_text_embeddings
        )
        student.init_from_text(embeddings)
    return student


def train_dataset(config: TrainConfig, samples: Sequence[Sample], student: Student, teacher: nn.Module | None):
    """The train pool with augmentation; teacher views only for a teacher that looks at images."""
    needs_images = teacher is not None and getattr(teacher, "needs_images", False)
    teacher_args = {}
    if needs_images:
        teacher_args = dict(
            teacher_size=config.teacher_size or teacher.input_size, teacher_mean=teacher.mean, teacher_std=teacher.std
        )
    transform = PairedTransform(
        config.student_size,
        student.mean,
        student.std,
        train=True,
        scale=tuple(config.crop_scale),
        hflip=config.hflip,
        interpolation=config.interpolation,
        **teacher_args,
    )
    views = teacher if isinstance(teacher, TeacherCache) else None
    return ImageDataset(samples, transform, config.image_mode, cache_images=config.cache_images, views=views)


def eval_dataset(config: TrainConfig, samples: Sequence[Sample], student: Student) -> ImageDataset:
    """A validation or test split: centre crop, student view only."""
    transform = PairedTransform(
        config.student_size, student.mean, student.std, train=False, interpolation=config.interpolation
    )
    return ImageDataset(samples, transform, config.image_mode, cache_images=config.cache_images)
