"""The small-scale study: DHO vs single-head KD vs CE-only, trained for the run length a stated rule fixes, by
dho_fast's trainer on Fashion-MNIST at 1% and 10% labels, with both stand-in teachers (``teachers.py``: ``oracle``
and the VLM-like ``caption``) and three seeds; and the paper's gradient-conflict analysis of the KD and DHO students.

The run length is fixed by one rule, decided before the study ran and the same for every method: ``STUDY_EPOCHS``
passes over the unlabelled pool, the shorter of two candidates E = 8 and 16 for which doubling the run (2E) raises no
method's validation accuracy by more than ``CONVERGED_GAIN`` in a pilot on a seed outside the study's
(``--pilot``: the caption teacher, both fractions, every method). The blend's alpha and beta come from the validation
split; both heads are reported beside it.

``python demo/run_study.py`` writes ``demo/study/results.json``, ``table.md`` (the README's table),
``gradient_conflict.png`` and ``val_curves.png``; ``--quick`` is CI's few-step version of the same code path (one
seed, writing to ``build/study-quick``); ``--pilot`` runs the run-length rule.
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
    FRACTIONS,
    METHODS,
    POOL_PER_CLASS,
    TEACHER_EPOCHS,
    TEACHER_SHARE,
    default_workers,
    run_students,
    student_job,
)
from teachers import TEACHERS, fit_teacher  # noqa: E402

from dho_fast.train.checkpoint import write_text_atomic  # noqa: E402

STUDY_SEEDS = (0, 1, 2)
STUDY_EPOCHS = 8  # the rule's pick in the pilot (README: at its boundary, and 16 -> 32 still gained 1.8 points)
PILOT_SEED = 100
PILOT_EPOCHS = (8, 16)
CONVERGED_GAIN = 0.01  # one point of validation accuracy: the 2,000 validation images' standard error is ~0.7
QUICK_STEPS = 6
METHOD_NAMES = {"dho": "DHO", "kd": "single-head KD", "ce": "CE only"}


def _jobs(
    data, out: Path, teachers, seeds, epochs: int, steps: int | None, teacher_epochs: int
) -> tuple[list[dict], dict[str, list[float]]]:
    """Every (teacher, seed, fraction, method) run, KD and DHO students logging the gradient conflict; and each
    teacher's test accuracy per seed."""
    jobs, teacher_accs = [], {}
    for teacher in teachers:
        for seed in seeds:
            seed_dir = out / f"seed{seed}"
            seed_dir.mkdir(parents=True, exist_ok=True)
            logits, acc = fit_teacher(teacher, data, seed_dir, seed, teacher_epochs)
            teacher_accs.setdefault(teacher, []).append(acc)
            for fraction in FRACTIONS:
                for method in METHODS:
                    jobs.append(
                        student_job(
                            data, seed_dir / f"{teacher}_{method}_{fraction:g}_e{epochs}", logits, teacher,
                            method=method, fraction=fraction, seed=seed, epochs=epochs, max_steps=steps,
                            log_gradient_conflict=method != "ce",
                        )
                    )  # fmt: skip
    return jobs, teacher_accs


def _mean_std(values: list[float]) -> list[float]:
    """``[mean, sample standard deviation]`` (0 for one value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per ``teacher/fraction/method``: ``[mean, sample std]`` over seeds of each accuracy (in %), and the seeds."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(f"{row['teacher']}/{row['fraction']:g}/{row['method']}", []).append(row)
    summary = {}
    for key, members in groups.items():
        entry = {"seeds": [m["seed"] for m in members]}
        for metric in ("test_acc", "test_acc_ce_head", "test_acc_kd_head", "val_acc"):
            if members[0][metric] is not None:
                entry[metric] = _mean_std([100 * m[metric] for m in members])
        summary[key] = entry
    return summary


def _cell(entry: dict, metric: str) -> str:
    mean, std = entry[metric]
    return f"{mean:.2f} ± {std:.2f}"


def format_table(summary: dict[str, dict], teacher_accs: dict[str, list[float]], num_train: int) -> str:
    """Markdown: a row per teacher and label fraction; test accuracy % (mean ± std over seeds) of DHO's blend and
    both its heads, single-head KD and CE only."""
    lines = [
        "| teacher (test acc %) | labels | DHO blend | DHO CE head | DHO KD head | single-head KD | CE only |",
        "|---|---|---|---|---|---|---|",
    ]
    for teacher, accs in teacher_accs.items():
        mean, std = _mean_std([100 * a for a in accs])
        for fraction in FRACTIONS:
            dho, kd, ce = (summary[f"{teacher}/{fraction:g}/{m}"] for m in METHODS)
            lines.append(
                f"| {teacher} ({mean:.1f} ± {std:.1f}) | {fraction:.0%} ({round(fraction * num_train)}) | "
                f"{_cell(dho, 'test_acc')} | {_cell(dho, 'test_acc_ce_head')} | {_cell(dho, 'test_acc_kd_head')} | "
                f"{_cell(kd, 'test_acc')} | {_cell(ce, 'test_acc')} |"
            )
    return "\n".join(lines)


def _mean_curve(curves: list[list[list]], column: int) -> tuple[list[int], list[float]]:
    """The mean over runs of one column of equally long ``[step, ...]`` curves, skipping undefined (None) values."""
    steps = [point[0] for point in curves[0]]
    means = []
    for i in range(len(steps)):
        values = [curve[i][column] for curve in curves if curve[i][column] is not None]
        means.append(statistics.fmean(values) if values else float("nan"))
    return steps, means


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_conflict(rows: list[dict], path: Path) -> None:
    """Cosine between the CE and KD terms' gradients over training (mean over seeds): a panel per teacher and
    gradient (features, backbone parameters), a line per student and label fraction."""
    plt = _pyplot()
    teachers = sorted({r["teacher"] for r in rows}, key=TEACHERS.index)
    fig, axes = plt.subplots(2, len(teachers), figsize=(5.5 * len(teachers), 7), sharex=True, squeeze=False)
    for col, teacher in enumerate(teachers):
        for row_index, (column, label) in enumerate(((1, "shared features"), (2, "backbone parameters"))):
            ax = axes[row_index][col]
            for method, color in (("kd", "tab:red"), ("dho", "tab:blue")):
                for fraction, style in zip(FRACTIONS, ("-", "--"), strict=True):
                    curves = [
                        r["gradient_conflict"]
                        for r in rows
                        if (r["teacher"], r["method"], r["fraction"]) == (teacher, method, fraction)
                    ]
                    steps, means = _mean_curve(curves, column)
                    ax.plot(steps, means, style, color=color, label=f"{METHOD_NAMES[method]}, {fraction:.0%} labels")
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_title(f"{teacher} teacher: gradients w.r.t. {label}")
            ax.set_ylabel("cos(grad CE term, grad KD term)")
            ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_curves(rows: list[dict], path: Path) -> None:
    """Validation accuracy at each epoch end (mean over seeds): the convergence evidence, a panel per teacher."""
    plt = _pyplot()
    teachers = sorted({r["teacher"] for r in rows}, key=TEACHERS.index)
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 3.8), squeeze=False)
    for ax, teacher in zip(axes[0], teachers, strict=True):
        for method, color in (("dho", "tab:blue"), ("kd", "tab:red"), ("ce", "tab:green")):
            for fraction, style in zip(FRACTIONS, ("-", "--"), strict=True):
                key = (teacher, method, fraction)
                curves = [r["val_curve"] for r in rows if (r["teacher"], r["method"], r["fraction"]) == key]
                epochs, means = _mean_curve(curves, 1)
                ax.plot(epochs, [100 * m for m in means], style + "o", color=color,
                        label=f"{METHOD_NAMES[method]}, {fraction:.0%}")  # fmt: skip
        ax.set_title(f"{teacher} teacher")
        ax.set_xlabel("epoch (passes over the unlabelled pool)")
        ax.set_ylabel("validation accuracy %")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pilot(args, data, out: Path) -> dict:
    """The run-length rule (module docs): for each candidate E in turn, trains E and 2E epochs (once each) and
    reports the largest gain of validation accuracy from doubling; stops at the first converged E."""
    val: dict[int, dict] = {}
    report = {}
    for epochs in PILOT_EPOCHS:
        missing = [e for e in (epochs, 2 * epochs) if e not in val]
        jobs = [
            job for e in missing for job in _jobs(data, out, ["caption"], [PILOT_SEED], e, None, args.teacher_epochs)[0]
        ]
        for row, job in zip(run_students(jobs, args.workers), jobs, strict=True):
            val.setdefault(job["epochs"], {})[row["fraction"], row["method"]] = row["val_acc"]
        # Accuracies are counts over the validation images: rounding drops the float noise of their difference, so
        # that a gain of exactly one point (20 of 2,000 images) is not read as more than one point.
        gains = {
            f"{f:.0%} {m}": round(val[2 * epochs][f, m] - val[epochs][f, m], 9) for f in FRACTIONS for m in METHODS
        }
        worst = max(gains, key=gains.get)
        report[epochs] = gains
        verdict = "converged" if gains[worst] <= CONVERGED_GAIN else "not converged"
        print(f"E = {epochs} -> {2 * epochs}: largest gain {100 * gains[worst]:+.2f} points ({worst}): {verdict}")
        if gains[worst] <= CONVERGED_GAIN:
            break
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--results", type=Path, help="results folder (demo/study; quick: build/study-quick)")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="where the images come from")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(STUDY_SEEDS))
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="the stand-in teachers' epochs")
    parser.add_argument("--workers", type=int, default=default_workers(), help="student runs in parallel")
    parser.add_argument("--quick", action="store_true", help=f"CI: one seed, {QUICK_STEPS} steps a run")
    parser.add_argument("--pilot", action="store_true", help="run the run-length rule instead of the study")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.results is None:
        args.results = Path("build/study-quick") if args.quick else Path(__file__).resolve().parent / "study"

    start = time.perf_counter()
    data = prepare(args.out / "data", args.source, teacher_share=TEACHER_SHARE, pool_per_class=POOL_PER_CLASS)
    out = args.out / "study" / Path(data.dirs["train"]).parent.name
    num_train = len(data.splits["train"][1])
    if args.pilot:
        return pilot(args, data, out / "pilot")
    steps = QUICK_STEPS if args.quick else None
    print(
        f"Study on {data.source}: {num_train} training images, teachers {TEACHERS}, seeds {args.seeds}, "
        f"{STUDY_EPOCHS} epochs a run{f' (capped at {steps} steps)' if steps else ''}, {args.workers} workers"
    )
    jobs, teacher_accs = _jobs(data, out, TEACHERS, args.seeds, STUDY_EPOCHS, steps, args.teacher_epochs)
    rows = run_students(jobs, args.workers)
    summary = summarise(rows)
    table = format_table(summary, teacher_accs, num_train)
    minutes = (time.perf_counter() - start) / 60
    results = {
        "source": data.source,
        "num_train": num_train,
        "epochs": STUDY_EPOCHS,
        "steps_cap": steps,
        "seeds": args.seeds,
        "workers": args.workers,
        "teacher_test_acc": teacher_accs,
        "summary": summary,
        "rows": rows,
        "minutes": minutes,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(results, indent=1), args.results / "results.json")
    write_text_atomic(table + "\n", args.results / "table.md")
    plot_conflict(rows, args.results / "gradient_conflict.png")
    plot_val_curves(rows, args.results / "val_curves.png")
    print(f"\nTest accuracy %, mean ± std over seeds {args.seeds}:\n\n{table}\n")
    print(f"({minutes:.1f} minutes; results, table and plots in {args.results})")
    return results


if __name__ == "__main__":
    main()
