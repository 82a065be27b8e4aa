"""``dho-fast teacher-cache``: runs a run's teacher once over its train pool and writes a store
(dho_fast.train.teacher_cache), resumably, in parallel across torchrun ranks."""

import json
from pathlib import Path

import torch

from dho_fast.train.build import build_teacher, load_splits
from dho_fast.train.checkpoint import remove_stale_temp_files, write_text_atomic
from dho_fast.train.config import TrainConfig
from dho_fast.train.data import load_classnames
from dho_fast.train.distributed import barrier, process_group
from dho_fast.train.teacher import LogitsTeacher
from dho_fast.train.teacher_cache import (
    FORMAT,
    HEADER_NAME,
    LOG_NAME,
    VERSION,
    CacheSettings,
    build_records,
    dataset_sha256,
    log_line,
    module_sha256,
    shard_paths,
    verify_shard,
    write_shard,
)
from dho_fast.train.transforms import PairedTransform

#: The settings that make the teacher what it is; the header records them with a hash of its weights.
TEACHER_SETTINGS = (
    "teacher", "teacher_arch", "teacher_pretrained", "teacher_precision", "teacher_templates",
    "teacher_text_embeddings", "teacher_logits", "tip_adapter_checkpoint", "open_clip_config", "teacher_size",
)  # fmt: skip


def write_teacher_cache(
    config: TrainConfig, output: str | Path, settings: CacheSettings, *, batch_size: int = 256
) -> Path:
    """Writes (or finishes) the store of ``config``'s teacher (open_clip, tip_adapter or logits) over its train
    pool into ``output``, views drawn with ``config``'s crop_scale, hflip, interpolation and seed; returns the
    folder. A folder holding a store of other settings, dataset or teacher is refused (ValueError naming what
    differs); its finished, intact shards are kept, damaged ones rewritten. Progress goes to stdout and the store's
    log file."""
    if config.teacher == "cache":
        raise ValueError("teacher-cache needs the teacher to run (open_clip, tip_adapter or logits), got 'cache'")
    root = Path(output)
    with process_group(config.device) as info:
        splits = load_splits(config)
        samples = splits.train
        classnames = load_classnames(config.classnames, splits.classnames)
        settings.check(len(classnames))
        torch.manual_seed(config.seed)  # as the trainer seeds it: a teacher of random weights is the same each time
        teacher = build_teacher(config, classnames, samples, info.device)
        size = config.teacher_size or getattr(teacher, "input_size", None) or config.student_size
        transform = PairedTransform(
            size, getattr(teacher, "mean", (0.0,)), getattr(teacher, "std", (1.0,)), train=settings.mode == "random",
            scale=tuple(config.crop_scale), hflip=config.hflip, interpolation=config.interpolation,
        )  # fmt: skip
        identity = {k: getattr(config, k) for k in TEACHER_SETTINGS}
        sha = teacher.sha256 if isinstance(teacher, LogitsTeacher) else module_sha256(teacher)
        num_shards = -(-len(samples) // settings.shard_size)
        header = {
            "format": FORMAT, "version": VERSION, "num_images": len(samples), "dataset_sha256": dataset_sha256(samples),
            "num_classes": len(classnames), **vars(settings), "num_shards": num_shards,
            "temperature": config.temperature, "crop_scale": list(config.crop_scale), "hflip": config.hflip,
            "interpolation": config.interpolation, "view_size": size, "image_mode": config.image_mode,
            "seed": config.seed, "teacher": identity, "teacher_sha256": sha,
        }  # fmt: skip
        _write_or_check_header(root, header, info.is_main)
        barrier(info)  # the other ranks write into the folder rank 0 has just made
        dtype = settings.record_dtype(len(classnames))
        mine = [s for s in range(num_shards) if s % info.world_size == info.rank]
        for shard in mine:
            first = shard * settings.shard_size
            count = min(settings.shard_size, len(samples) - first)
            data_path, meta_path = shard_paths(root, shard)
            remove_stale_temp_files(data_path)
            if meta_path.is_file():
                try:
                    verify_shard(root, shard, count, dtype)
                    continue
                except (ValueError, FileNotFoundError) as error:
                    log_line(root, info.rank, f"rewriting {data_path.name}: {error}")
            records = build_records(
                teacher, samples, first, count, transform, settings, image_mode=config.image_mode,
                temperature=config.temperature, seed=config.seed, num_classes=len(classnames),
                batch_size=batch_size, device=info.device,
            )  # fmt: skip
            write_shard(root, shard, records)
            log_line(root, info.rank, f"wrote {data_path.name} (images {first}-{first + count - 1})")
            if config.progress:
                print(f"teacher-cache rank {info.rank}: shard {shard + 1} of {num_shards} written", flush=True)
    return root


def _write_or_check_header(root: Path, header: dict, is_main: bool) -> None:
    """A new folder gets the header (from rank 0); an existing store must have been written with this one."""
    path = root / HEADER_NAME
    if path.is_file():
        existing = json.loads(path.read_text())
        differ = sorted(k for k in set(header) | set(existing) if header.get(k) != existing.get(k))
        if differ:
            raise ValueError(
                f"{root} holds a teacher store written with other settings, dataset or teacher ({', '.join(differ)} "
                "differ): choose another output folder"
            )
        return
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(header, indent=1), path)
        (root / LOG_NAME).touch()
