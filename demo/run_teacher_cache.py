"""What a stored teacher costs in accuracy: DHO on the demo's data with the live teacher against stores of its soft
labels (dho-fast teacher-cache): dense rows and top-k with the uniform tail, k = 1, 5 and 10, three seeds.

Every run is the demo's DHO student (``run_demo.STUDENT_SETTINGS``, ``DEMO_EPOCHS``) with the VLM-like caption
teacher (``teachers.py``), at 1% and 10% labels. "live" reads the teacher's logits as the demo does, each step's crop
drawn afresh; a store holds ``VIEWS`` crops per image (boxes and flips) with the teacher's distribution at T, and
each step trains on one of them. The stand-in teacher is an MLP on the whole image, so its distribution does not
depend on the crop: what differs from "live" is the finite set of views and the top-k approximation, which is what
a store adds.

``python demo/run_teacher_cache.py`` writes ``demo/teacher_cache/results.json`` and ``table.md`` (the README's).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules beside this file, run as a script

from prepare_data import SOURCES, prepare  # noqa: E402
from run_demo import (  # noqa: E402
    DEMO_EPOCHS,
    FRACTIONS,
    POOL_PER_CLASS,
    TEACHER_EPOCHS,
    TEACHER_SHARE,
    default_workers,
    run_students,
    student_job,
)
from teachers import fit_teacher  # noqa: E402

from dho_fast.train.checkpoint import write_text_atomic  # noqa: E402
from dho_fast.train.config import TrainConfig  # noqa: E402
from dho_fast.train.teacher_cache import CacheSettings  # noqa: E402
from dho_fast.train.write_teacher_cache import write_teacher_cache  # noqa: E402

SEEDS = (0, 1, 2)
VIEWS = 10
#: The teacher variants: None is the live teacher; a store's top-k (None inside: dense rows).
VARIANTS = {"live": None, "dense store": CacheSettings(VIEWS, None), **{
    f"top-{k} store": CacheSettings(VIEWS, k) for k in (1, 5, 10)
}}  # fmt: skip


def _store(job: dict, path: Path, settings: CacheSettings) -> Path:
    """Writes (or finds finished) the store of the job's teacher logits over its train pool."""
    config = TrainConfig(
        **{k: v for k, v in job.items() if k not in ("teacher_kind", "fraction")}, labelled_fraction=job["fraction"]
    )
    return write_teacher_cache(config, path, settings, batch_size=1024)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "teacher_cache")
    parser.add_argument("--source", choices=SOURCES, default="auto")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    parser.add_argument("--steps", type=int, help="cap on each student's optimizer steps (a quick check)")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = prepare(args.out / "data", args.source, teacher_share=TEACHER_SHARE, pool_per_class=POOL_PER_CLASS)
    out = args.out / "teacher_cache" / Path(data.dirs["train"]).parent.name
    jobs, store_seconds = [], 0.0
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        logits, _ = fit_teacher("caption", data, seed_dir, seed, TEACHER_EPOCHS)
        for name, settings in VARIANTS.items():
            for fraction in FRACTIONS:
                tag = name.replace(" ", "_")
                job = student_job(data, seed_dir / f"{tag}_{fraction:g}", logits, name, method="dho",
                                  fraction=fraction, seed=seed, epochs=args.epochs, max_steps=args.steps)  # fmt: skip
                if settings is not None:
                    began = time.perf_counter()
                    store = _store(job, seed_dir / f"store_{tag}", settings)
                    store_seconds += time.perf_counter() - began
                    job = {**job, "teacher": "cache", "teacher_cache": str(store), "teacher_logits": None}
                jobs.append(job)
    rows = run_students(jobs, args.workers)
    table = ["| labels | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    summary = {}
    for fraction in FRACTIONS:
        cells = []
        for name in VARIANTS:
            accs = [100 * r["test_acc"] for r in rows if r["teacher"] == name and r["fraction"] == fraction]
            mean, std = statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
            summary[f"{fraction:g}/{name}"] = [mean, std]
            cells.append(f"{mean:.2f} ± {std:.2f}")
        table.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    minutes = (time.perf_counter() - start) / 60
    results = {"seeds": args.seeds, "epochs": args.epochs, "views": VIEWS, "summary": summary, "rows": rows,
               "store_minutes": store_seconds / 60, "minutes": minutes}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(results, indent=1), args.results / "results.json")
    write_text_atomic("\n".join(table) + "\n", args.results / "table.md")
    print(f"\nDHO test accuracy %, mean ± std over seeds {args.seeds}:\n\n" + "\n".join(table))
    print(f"\n({minutes:.1f} minutes, of which {store_seconds / 60:.1f} writing the stores)")
    return results


if __name__ == "__main__":
    main()
