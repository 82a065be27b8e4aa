"""``dho-fast``: ``train`` a student from a YAML config and flags, ``eval`` a checkpoint, ``active`` learning.

Every setting of :class:`~dho_fast.train.config.TrainConfig` is a flag (``lr`` is ``--lr``, ``train_dir`` is
``--train-dir``; ``none`` unsets an optional one); flags override the YAML files given with ``--config`` (repeat
it to layer files, as ``configs/fewshot/`` does: each file overrides the ones before). A boolean
setting is a switch without a value (``--hflip`` / ``--no-hflip``): ``--hflip false`` is refused, as argparse
refuses any stray word, so no string is ever read as a boolean.
``teacher-cache --config FILE --output DIR`` runs the config's teacher once over its train pool and writes a store of
soft labels per augmented view (``--views``, ``--topk``; dho_fast.train.teacher_cache) that ``teacher: cache`` then
trains from; the config's dataset, teacher, crop settings, temperature and seed decide what is stored.
``active --config FILE`` takes a few flags of the loop's top-level settings (``--resume``, ``--output-dir``,
``--strategy``, ``--rounds``, ``--budget``, ``--seed``, ``--no-progress``); its train settings come from the file.
Multi-GPU (``train``): ``torchrun --nproc_per_node 8 -m dho_fast.train.cli train --config ...``.
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dho_fast.train.config import InputTypeError, TrainConfig, field_types, load_config
from dho_fast.train.teacher_cache import MODES, TAILS, VALUE_DTYPES


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    kinds = field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = kinds[f.name]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif kind is tuple:
            parser.add_argument(flag, dest=f.name, type=float, nargs="+", default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, type=_optional(kind), default=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dho-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a student (DHO, or the kd / ce baselines)")
    train.add_argument(
        "--config",
        action="append",
        help="YAML file of settings (configs/); repeat it to layer files, each overriding the ones before",
    )
    _add_setting_flags(train)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its run's val or test split")
    evaluate.add_argument("checkpoint", help="a checkpoint written by train (output_dir/last.pt)")
    evaluate.add_argument("--split", choices=("val", "test"), default="test")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    _add_setting_flags(evaluate)
    cache = commands.add_parser("teacher-cache", help="run the teacher once and store its soft labels per view")
    cache.add_argument("--config", action="append", help="YAML file of settings, as for train (repeatable)")
    cache.add_argument("--output", required=True, help="the store's folder (an unfinished one is resumed)")
    cache.add_argument("--views", type=int, default=10, help="augmented views per image (mode random)")
    cache.add_argument("--topk", type=_optional(int), default=5, help="classes kept per view; none: dense rows")
    cache.add_argument("--tail", choices=TAILS, default="uniform", help="how training fills the other classes")
    cache.add_argument("--value-dtype", choices=VALUE_DTYPES, default="float16")
    cache.add_argument("--mode", choices=MODES, default="random", help="center: one centred view per image")
    cache.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    cache.add_argument("--batch-size", type=int, default=256, help="views per teacher forward")
    _add_setting_flags(cache)
    active = commands.add_parser("active", help="active learning (ActiveKD): rounds of selection and DHO training")
    active.add_argument("--config", required=True, help="YAML file of active settings and train: (configs/active_*)")
    active.add_argument("--resume", action="store_true", default=argparse.SUPPRESS, help="continue a killed run")
    active.add_argument("--output-dir", dest="output_dir", default=argparse.SUPPRESS)
    active.add_argument("--strategy", default=argparse.SUPPRESS)
    active.add_argument("--rounds", type=int, default=argparse.SUPPRESS)
    active.add_argument("--budget", type=_optional(int), default=argparse.SUPPRESS)
    active.add_argument("--seed", type=int, default=argparse.SUPPRESS)
    active.add_argument("--progress", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for key, value in metrics.items():
        shown = f"{100 * value:.2f}%" if key.startswith("acc") else f"{value:g}"
        print(f"  {key:<10} {shown}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    reports = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports
    try:
        if args.command == "train":
            from dho_fast.train.trainer import BEST_CHECKPOINT_NAME, train

            result = train(load_config(args.config, _settings(args)))
            if not reports:
                return 0
            best = "" if result.best_val_step is None else f" (the best validation epoch, step {result.best_val_step})"
            if result.val:
                _print_metrics(f"validation{best}", result.val)
            if result.test:
                _print_metrics(f"test{best}", result.test)
            print(
                f"checkpoint: {result.checkpoint}" + ("" if not best else f"; tested weights: {BEST_CHECKPOINT_NAME}")
            )
        elif args.command == "teacher-cache":
            from dho_fast.train.teacher_cache import CacheSettings
            from dho_fast.train.write_teacher_cache import write_teacher_cache

            views = 1 if args.mode == "center" else args.views
            settings = CacheSettings(views, args.topk, args.tail, args.value_dtype, args.mode, args.shard_size)
            path = write_teacher_cache(load_config(args.config, _settings(args)), args.output, settings,
                                       batch_size=args.batch_size)  # fmt: skip
            if reports:
                print(f"teacher store: {path}")
        elif args.command == "active":
            from dho_fast.train.active import LOG_NAME, run_active
            from dho_fast.train.active_config import load_active_config

            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
            config = load_active_config(args.config, overrides)
            run_active(config)
            print(f"log: {os.path.join(config.output_dir, LOG_NAME)}.csv")
        else:
            from dho_fast.train.eval_checkpoint import evaluate_checkpoint

            metrics = evaluate_checkpoint(args.checkpoint, args.split, _settings(args))
            if not reports:
                return 0
            _print_metrics(args.split, metrics)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(metrics, f, indent=2)
    except (ValueError, InputTypeError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"dho-fast: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
