"""The active-learning demo: ActiveKD's loop on real images with every selection strategy, run by dho_fast itself.

Offline and on CPU, with the images of ``run_demo.py`` (Fashion-MNIST as ImageFolder trees, no teacher hold-out)
and its ``oracle`` teacher (``teachers.py``): a small MLP fitted on all training labels standing in for a
vision-language model (whose weights cannot be downloaded here), its logits on the training images cached once.
Each strategy runs ``dho_fast.train.active.run_active``: 1 labelled image per class, then ``--rounds`` rounds that
each pick ``--budget`` images from a fixed pool (a seeded subsample of ``--pool-size`` training images, so that
scoring the pool stays cheap), reveal their labels and train the DHO student from scratch for ``--steps`` steps.
The test accuracy is DHO's blend with the loop's fixed alpha = 0.5, beta = 1.
Every strategy has the same settings (``ACTIVE_STUDENT_SETTINGS``, the same seed, steps and
pool); only the strategy changes, and nothing is tuned for any of them.

``python demo/run_active.py [--seed 0 1 2] [--steps 50]`` prints a table of test accuracy (rows: labelled images,
columns: strategies; the mean over the seeds); ``--json`` and ``--plot`` also write the results and a PNG plot
(needs matplotlib).
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # prepare_data and run_demo beside this file

from prepare_data import SOURCES, prepare  # noqa: E402
from run_demo import STUDENT_SETTINGS  # noqa: E402
from teachers import fit_teacher  # noqa: E402

from dho_fast.select import STRATEGIES  # noqa: E402
from dho_fast.train.active import run_active  # noqa: E402
from dho_fast.train.active_config import ActiveConfig  # noqa: E402

# The demo's students: those of run_demo.py with the wider CNN and the batches its committed results were measured
# with, and no epoch limit (each round trains --steps steps).
ACTIVE_STUDENT_SETTINGS = {
    **STUDENT_SETTINGS,
    "cnn_width": 16,
    "labelled_batch_size": 32,
    "unlabelled_batch_size": 96,
    "epochs": None,
    "log_every": 50,
    # Its train tree holds 58,000 images of which a round's student sees at most 2,000: decoding all of them in
    # every round would cost more than it saves.
    "cache_images": False,
}


def run_strategies(data, out: Path, logits: Path, seed: int, args: argparse.Namespace) -> dict[str, list[dict]]:
    """One active-learning run per strategy, from scratch; returns each run's log records."""
    train = {
        **ACTIVE_STUDENT_SETTINGS,
        "train_dir": data.dirs["train"],
        "test_dir": data.dirs["test"],  # no val_dir: active learning has no validation set
        "student_size": data.splits["train"][0].shape[1],
        "teacher": "logits",
        "teacher_logits": str(logits),
        "max_steps": args.steps,
        "num_workers": args.num_workers,
        "device": "cpu",
    }
    results = {}
    for strategy in args.strategies:
        run_dir = out / f"active_{strategy}"
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        config = ActiveConfig(
            strategy=strategy,
            rounds=args.rounds,
            budget=args.budget,
            initial_shots=1,
            pool_size=args.pool_size,
            output_dir=str(run_dir),
            seed=seed,
            progress=False,
            train=train,
        )
        results[strategy] = run_active(config)
        curve = ", ".join(f"{r['num_labelled']}: {100 * r['test_acc_blend']:.1f}%" for r in results[strategy])
        print(f"seed {seed} {strategy:>14} ({time.perf_counter() - start:.0f} s) {curve}", flush=True)
    return results


def accuracy_curves(runs: list[dict]) -> dict[str, dict]:
    """Per strategy: the labelled images of each round and the blend's test accuracy in %, its mean over the seeds'
    ``runs`` and its sample standard deviation (0 for one seed)."""
    curves = {}
    for strategy, records in runs[0]["results"].items():
        per_round = [[100 * run["results"][strategy][i]["test_acc_blend"] for run in runs] for i in range(len(records))]
        curves[strategy] = {
            "labels": [r["num_labelled"] for r in records],
            "mean": [statistics.fmean(values) for values in per_round],
            "std": [statistics.stdev(values) if len(values) > 1 else 0.0 for values in per_round],
        }
    return curves


def format_table(curves: dict[str, dict], num_seeds: int) -> str:
    """Markdown: a row per round (its labelled images), a column per strategy, the blend's test accuracy in % (the
    mean ± standard deviation over the seeds when there are several)."""
    strategies = list(curves)
    lines = ["| labels | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for i, labels in enumerate(curves[strategies[0]]["labels"]):
        cells = [
            f"{curves[s]['mean'][i]:.2f}" + (f" ± {curves[s]['std'][i]:.2f}" if num_seeds > 1 else "")
            for s in strategies
        ]
        lines.append(f"| {labels} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, dict], path: Path, title: str) -> bool:
    """Test accuracy against labelled images, a line per strategy (error bars: the standard deviation over seeds),
    as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, curve in curves.items():
        ax.errorbar(curve["labels"], curve["mean"], yerr=curve["std"], marker="o", capsize=3, label=strategy)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy % (DHO blend)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (the table: their mean)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--source", choices=SOURCES, default="auto", help="where the images come from")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of each round's student")
    parser.add_argument("--rounds", type=int, default=5, help="selection rounds after the initial 1-shot round")
    parser.add_argument("--budget", type=int, default=10, help="images picked each round")
    parser.add_argument("--pool-size", type=int, default=2000, help="training images in the fixed selection pool")
    parser.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the stand-in teacher")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    # One thread by default: on this 2-core machine a second one made the small student's step 2.6x slower, not
    # faster (103 ms against 272 ms for 128 images, measured while other jobs shared the cores).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also write a PNG plot here (needs matplotlib)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare(args.out / "data", args.source)
    num_train = len(data.splits["train"][1])
    seeds = ", ".join(map(str, args.seed))
    print(
        f"ActiveKD demo on {data.source} ({num_train} training images, a pool of {args.pool_size}, seeds {seeds}): "
        f"1 label per class, then {args.rounds} rounds of {args.budget}, {args.steps} steps per round"
    )
    runs = []
    for seed in args.seed:
        out = args.out / data.source / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        logits, teacher_acc = fit_teacher("oracle", data, out, seed, args.teacher_epochs)
        runs.append(
            {"seed": seed, "teacher_test_acc": teacher_acc, "results": run_strategies(data, out, logits, seed, args)}
        )
    curves = accuracy_curves(runs)
    teacher = ", ".join(f"{100 * run['teacher_test_acc']:.2f}%" for run in runs)
    print(
        f"\nTeacher: a small MLP fitted on all training labels, test accuracy {teacher}. It stands in for a "
        "vision-language model, whose weights cannot be downloaded here; its logits are cached once."
    )
    over = f", mean ± standard deviation over seeds {seeds}" if len(runs) > 1 else ""
    print(f"Test accuracy % of the DHO blend (alpha = 0.5, beta = 1) after each round{over}:\n")
    print(format_table(curves, len(runs)))
    total_s = time.perf_counter() - start
    print(f"\n(total {total_s:.0f} s)")
    summary = {
        "source": data.source,
        "steps": args.steps,
        "rounds": args.rounds,
        "budget": args.budget,
        "pool_size": args.pool_size,
        "runs": runs,
        "curves": curves,
        "seconds": total_s,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot:
        if plot(curves, args.plot, f"ActiveKD demo, {data.source}, seeds {seeds}"):
            print(f"plot: {args.plot}")
        else:
            print("matplotlib is not installed: no plot written (pip install matplotlib)")
    return summary


if __name__ == "__main__":
    main()
