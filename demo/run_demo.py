"""The embedded demo: DHO vs single-head KD vs CE-only on real images, trained by dho_fast's own trainer; the short
version of the study (``run_study.py``).

Offline and on CPU. Images: Fashion-MNIST written as ImageFolder PNG trees (see ``prepare_data.py``), with a share of
the training images held out for the teacher. 1% and 10% of the students' pool keep their labels; the rest of the
pool is unlabelled. The teacher is NOT a vision-language model: no VLM weights can be downloaded here, so a small
MLP stands in for one (``teachers.py``; the demo's is the VLM-like ``caption`` teacher). Its logits on the pool are
computed once and cached, so the runs measure the students. Every student goes through ``dho_fast.train`` (data
pipeline, fused loss, evaluation of both heads and the blend, alpha/beta searched on the validation split) with the
same settings; only the method and the label fraction change. Runs go in parallel processes, one torch thread each.

``python demo/run_demo.py [--seed 0]`` prints a table of test accuracies; ``--json`` also writes the results.
"""

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules beside this file, run as a script

from prepare_data import SOURCES, PreparedData, prepare  # noqa: E402
from teachers import TEACHERS, fit_teacher  # noqa: E402

from dho_fast.train.checkpoint import write_text_atomic  # noqa: E402
from dho_fast.train.config import TrainConfig  # noqa: E402
from dho_fast.train.trainer import train  # noqa: E402

METHODS = ("dho", "kd", "ce")
FRACTIONS = (0.01, 0.1)
# The share of each class of the training images held out for the caption teacher (no student sees them), and the
# images per class of the students' pool: 11,600 of Fashion-MNIST's 60,000, small enough for the study's runs to
# fit on a 2-core CPU.
TEACHER_SHARE = 0.2
POOL_PER_CLASS = 1160

# One setting for every student run of the demo and the study: METHOD.md's few-shot recipe (AdamW, 10% linear
# warm-up then linear decay, T = 2, w_ce = w_kd = 0.5, paired labelled and unlabelled batches of 64) scaled to 28x28
# images and a 2-core CPU: a small CNN, lr 3e-3 rather than 1e-3 and milder crops (scale 0.85-1); chosen for every
# method alike. Only the method, the label fraction and the run length change between runs. The images are decoded
# once and kept in memory (cache_images): opening a 28x28 PNG costs more than training on it.
STUDENT_SETTINGS = dict(
    student="cnn",
    cnn_width=8,
    image_mode="L",
    crop_scale=(0.85, 1.0),
    hflip=True,
    labelled_batch_size=64,
    unlabelled_batch_size=64,
    lr=3e-3,
    weight_decay=0.01,
    warmup_fraction=0.1,
    lr_decay="linear",
    temperature=2.0,
    ce_loss_weight=0.5,
    kd_loss_weight=0.5,
    eval_batch_size=500,
    checkpoint_every=10_000,
    log_every=25,
    progress=False,
    cache_images=True,
)
# The demo's run length: passes over the unlabelled pool (the study's is longer; see run_study.py).
DEMO_EPOCHS = 4
# The stand-in teachers' epochs over the pool (about 540 optimizer steps each).
TEACHER_EPOCHS = 12


ROW_FILE = "row.json"  # a finished run's job and row, beside its metrics


def finished_row(job: dict) -> dict | None:
    """The row of ``job``'s run when a run of exactly these settings finished in its folder, else None."""
    path = Path(job["output_dir"]) / ROW_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["row"] if saved["job"] == json.loads(json.dumps(job)) else None


def _run_one(job: dict) -> dict:
    """Trains one student from scratch (a worker process's task); returns its row, also written (atomically, last)
    to the run folder's ``row.json`` with the job, so that a rerun with ``reuse`` can keep it."""
    torch.set_num_threads(1)
    run_dir = Path(job["output_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    settings = {k: v for k, v in job.items() if k not in ("teacher_kind", "fraction")}
    result = train(TrainConfig(**settings, labelled_fraction=job["fraction"]))
    test, val = result.test, result.val
    method = job["method"]
    train_records = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]
    row = {
        "teacher": job["teacher_kind"],
        "seed": job["seed"],
        "fraction": job["fraction"],
        "method": method,
        "steps": result.steps,
        "test_acc": test["acc_blend"] if method == "dho" else test["acc"],
        "test_acc_ce_head": test.get("acc_ce"),
        "test_acc_kd_head": test.get("acc_kd"),
        "val_acc": val["acc_blend"] if method == "dho" else val["acc"],
        "val_acc_ce_head": val.get("acc_ce"),
        "val_acc_kd_head": val.get("acc_kd"),
        "alpha": result.alpha,
        "beta": result.beta,
        # Validation accuracy at each epoch end (the blend's for DHO): the convergence evidence.
        "val_curve": [
            [h["epoch"], h["acc_blend"] if method == "dho" else h["acc"]] for h in result.history if h["split"] == "val"
        ],
        "gradient_conflict": [
            [r["step"], r["grad_cos_features"], r["grad_cos_backbone"]]
            for r in train_records
            if "grad_cos_features" in r
        ],
        "seconds": time.perf_counter() - start,
    }
    write_text_atomic(json.dumps({"job": job, "row": row}), run_dir / ROW_FILE)
    return row


def student_job(data: PreparedData, run_dir: Path, logits: Path, teacher_kind: str, **settings) -> dict:
    """The settings of one student run on ``data``'s trees with the teacher logits file ``logits``. ``settings``:
    ``method``, ``fraction``, ``seed`` and the run length (``epochs``, ``max_steps``), and any other TrainConfig
    key."""
    return {
        **STUDENT_SETTINGS,
        "student_size": data.splits["train"][0].shape[1],
        "train_dir": data.dirs["train"],
        "val_dir": data.dirs["val"],
        "test_dir": data.dirs["test"],
        "teacher": "logits",
        "teacher_logits": str(logits),
        "teacher_kind": teacher_kind,
        "output_dir": str(run_dir),
        "num_workers": 0,
        "device": "cpu",
        **settings,
    }


def run_students(jobs: list[dict], workers: int, reuse: bool = False) -> list[dict]:
    """Runs every job (:func:`student_job`) in ``workers`` processes of one torch thread each; rows in job order.
    Prints a line as each run ends. ``reuse``: a job whose run already finished with the same settings
    (:func:`finished_row`) keeps its row instead of training again, so a killed study resumes."""
    kept = {i: row for i, job in enumerate(jobs) if reuse and (row := finished_row(job)) is not None}
    todo = [job for i, job in enumerate(jobs) if i not in kept]
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(todo))), mp_context=get_context("spawn")) as pool:
        trained = pool.map(_run_one, todo)
        rows = []
        for i in range(len(jobs)):
            row = kept[i] if i in kept else next(trained)
            print(
                f"  {row['teacher']:>7} seed {row['seed']} {row['fraction']:.0%} {row['method']:>3}: test "
                f"{100 * row['test_acc']:.2f}% ({row['steps']} steps, {row['seconds']:.0f} s"
                f"{', kept from an earlier run' if i in kept else ''})",
                flush=True,
            )
            rows.append(row)
    return rows


def default_workers() -> int:
    """One worker per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(rows: list[dict], num_train: int) -> str:
    lines = [
        "| labels | method | test acc % | CE head % | KD head % | alpha | beta |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        labels = f"{r['fraction']:.0%} ({round(r['fraction'] * num_train)})"
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(
            f"| {labels} | {r['method']} | {_pct(r['test_acc'])} | {_pct(r['test_acc_ce_head'])} | "
            f"{_pct(r['test_acc_kd_head'])} | {alpha} | {beta} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--source", choices=SOURCES, default="auto", help="where the images come from")
    parser.add_argument("--teacher", choices=TEACHERS, default="caption", help="the stand-in teacher (teachers.py)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="passes over the unlabelled pool")
    parser.add_argument("--steps", type=int, help="cap on each student's optimizer steps (CI's short demo)")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="the stand-in teacher's epochs")
    parser.add_argument("--workers", type=int, default=default_workers(), help="student runs in parallel")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = prepare(args.out / "data", args.source, teacher_share=TEACHER_SHARE, pool_per_class=POOL_PER_CLASS)
    setup_s = time.perf_counter() - start
    out = args.out / Path(data.dirs["train"]).parent.name / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    logits, teacher_acc = fit_teacher(args.teacher, data, out, args.seed, args.teacher_epochs)
    teacher_s = time.perf_counter() - start - setup_s
    num_train = len(data.splits["train"][1])
    length = dict(epochs=args.epochs, max_steps=args.steps)
    print(f"DHO demo on {data.source} ({num_train} training images, seed {args.seed}, {args.epochs} epoch(s))")
    jobs = [
        student_job(data, out / f"{args.teacher}_{m}_{f:g}", logits, args.teacher, method=m, fraction=f,
                    seed=args.seed, **length)
        for f in args.fractions for m in args.methods
    ]  # fmt: skip
    rows = run_students(jobs, args.workers)
    print(
        f"\nTeacher: {args.teacher!r} (demo/teachers.py), a small MLP standing in for a vision-language model, whose "
        f"weights cannot be downloaded here; test accuracy {100 * teacher_acc:.2f}%; its logits are cached once."
    )
    print("DHO's test accuracy is the blend with alpha/beta chosen on the validation split.\n")
    print(format_table(rows, num_train))
    total_s = time.perf_counter() - start
    print(f"\n(data set-up {setup_s:.0f} s, teacher {teacher_s:.0f} s, total {total_s:.0f} s, {args.workers} workers)")
    results = {
        "source": data.source,
        "seed": args.seed,
        "teacher": args.teacher,
        "epochs": args.epochs,
        "steps": args.steps,
        "teacher_test_acc": teacher_acc,
        "num_train": num_train,
        "rows": rows,
        "seconds": total_s,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
