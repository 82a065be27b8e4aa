"""Turns the suite's pytest-benchmark JSON into the README's performance tables and a PNG of speed-up by shape.

    python bench/report.py bench/results/bench.json [--plot bench/results/speedup.png] [--readme README.md]

Per op, ratios first, then absolute figures. Every ratio is the median over a case's interleaved rounds of that round's
ratio (bench/interleaved.py): ``eager / fused-cpu`` is how many times faster the fused op was than eager in a typical
round. Yardsticks: ``copy / fused`` is the share of copy bandwidth the fused loss reaches (bench/bench_loss.py),
``read / fused`` the same for the k-center step's one read of the pool, ``fused / gemms`` what the fused linear op
costs beyond its unavoidable matmuls, ``fused / forward-only`` what the loss's backward adds to its forward,
``fused / float32`` a bf16 case's time against the same fused call on float32 copies of its inputs. Peak
memory is bench/memory.py's (bytes of tensors a call holds at once beyond its inputs). ``--readme`` replaces the text
between the README's ``<!-- bench-report:begin -->`` and ``<!-- bench-report:end -->`` lines.
"""

import argparse
import json
import os
import statistics
from collections import defaultdict

from interleaved import median_ratio

BEGIN, END = "<!-- bench-report:begin -->", "<!-- bench-report:end -->"
BASELINES = ("eager", "compile", "liger")
#: yardstick -> (column, whether the fused time is the numerator)
YARDSTICKS = {"copy": ("share of copy", False), "read": ("share of read", False), "gemms": ("/ gemms", True),
              "forward-only": ("/ forward-only", True), "float32": ("/ float32", True)}  # fmt: skip
CASE_KEYS = ("mode", "N", "D", "C", "dtype")


def load(paths: list[str]) -> list[dict]:
    """The suite's cases: each ``extra_info`` of the JSON files (op, case, machine, times_s, peak_bytes, rounds)."""
    records = []
    for path in paths:
        with open(path) as f:
            records += [b["extra_info"] for b in json.load(f)["benchmarks"] if "times_s" in b["extra_info"]]
    return records


def by_op(records: list[dict]) -> dict[str, list[dict]]:
    ops: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        ops[r["op"]].append(r)
    return ops


def fused_providers(record: dict) -> list[str]:
    return [p for p in record["times_s"] if p.startswith("fused-")]


def ratio_columns(record: dict) -> list[tuple[str, str, str]]:
    """(column title, numerator, denominator) of the ratios a case has."""
    columns = []
    for fused in fused_providers(record):
        columns += [(f"{b} / {fused}", b, fused) for b in BASELINES if b in record["times_s"]]
    primary = next(iter(fused_providers(record)), None)
    for name, (title, fused_on_top) in YARDSTICKS.items():
        if name in record["times_s"] and primary:
            columns.append((f"{primary} {title}", primary, name) if fused_on_top else (f"{title}", name, primary))
    return columns


def _case_cells(record: dict, keys: list[str]) -> list[str]:
    return [str(record["case"][k]) for k in keys]


def _case_keys(records: list[dict]) -> list[str]:
    return [k for k in CASE_KEYS if any(k in r["case"] for r in records)]


def _markdown(header: list[str], rows: list[list[str]], numeric_from: int) -> list[str]:
    align = ["---"] * numeric_from + ["---:"] * (len(header) - numeric_from)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def ratio_table(records: list[dict]) -> list[str]:
    keys = _case_keys(records)
    titles: list[str] = []
    for r in records:
        titles += [t for t, _, _ in ratio_columns(r) if t not in titles]
    memory = [f"peak {p} / eager" for p in dict.fromkeys(p for r in records for p in fused_providers(r))]
    rows = []
    for r in records:
        cells = {t: f"{median_ratio(r['times_s'], a, b):.2f}" for t, a, b in ratio_columns(r)}
        for p, title in zip(dict.fromkeys(p for r2 in records for p in fused_providers(r2)), memory, strict=True):
            eager = r["peak_bytes"].get("eager")
            if p in r["peak_bytes"] and eager:
                ratio = r["peak_bytes"][p] / eager
                cells[title] = f"{ratio:.2g}" if ratio >= 0.01 else "< 0.01"
        rows.append(_case_cells(r, keys) + [cells.get(t, "") for t in titles + memory])
    return _markdown(keys + titles + memory, rows, len(keys))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 1024:.0f} KiB"


def medians_table(records: list[dict]) -> list[str]:
    keys = _case_keys(records)
    providers = list(dict.fromkeys(p for r in records for p in r["times_s"]))
    rows = []
    for r in records:
        cells = []
        for p in providers:
            if p not in r["times_s"]:
                cells.append("")
                continue
            ms = statistics.median(r["times_s"][p]) * 1e3
            cells.append(f"{ms:.3g} ms / {_size(r['peak_bytes'][p])}")
        rows.append(_case_cells(r, keys) + cells)
    return _markdown(keys + providers, rows, len(keys))


def train_step_table(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        t, batch = r["times_s"], r["case"]["N"]
        rows.append(
            [
                str(r["case"]["C"]),
                f"{batch / statistics.median(t['fused']):.0f}",
                f"{batch / statistics.median(t['eager']):.0f}",
                f"{median_ratio(t, 'eager', 'fused'):.2f}",
                f"{median_ratio(t, 'fused-loss', 'fused'):.1%}",
                f"{median_ratio(t, 'eager-loss', 'eager'):.1%}",
            ]
        )
    header = ["C", "images/s fused", "images/s eager", "eager / fused step", "loss share, fused", "loss share, eager"]
    return _markdown(header, rows, 0)


def machine_line(records: list[dict]) -> str:
    machines = {json.dumps(r["machine"], sort_keys=True) for r in records}
    described = []
    for m in map(json.loads, sorted(machines)):
        where = m.get("gpu", m["cpu"])
        cap = f" capped by ATEN_CPU_CAPABILITY={m['isa_cap']}" if m.get("isa_cap") else ""
        described.append(f"{where}, dho_fast CPU kernels {m['cpu_kernel_isa']} (ATen {m['aten_cpu_capability']}){cap}, "
                         f"{m['threads']} threads, torch {m['torch']}, device {m['device']}")  # fmt: skip
    return "; ".join(described)


def report(records: list[dict]) -> str:
    rounds = sorted({r["rounds"] for r in records})
    lines = [f"Machine: {machine_line(records)}. Rounds per case: {rounds[0]}-{rounds[-1]}.", ""]
    for op, cases in by_op(records).items():
        lines += [f"`{op}`, ratios (median of per-round ratios):", ""]
        lines += train_step_table(cases) if op == "train_step" else ratio_table(cases)
        lines += ["", f"`{op}`, median time / peak memory per provider:", ""]
        lines += medians_table(cases)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _short_label(case: dict) -> str:
    """``N x C``, dtype and mode on three lines: a tick label of the plot (the tables give D)."""
    shape = f"{case['N']} x {case['C']}"
    return f"{shape}\n{case['dtype']}\n{'fwd+bwd' if case['mode'] == 'forward+backward' else 'fwd'}"


def plot(records: list[dict], path: str) -> None:
    """One panel per op: eager / fused and compile / fused by case (log scale), the first fused backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ops = {op: cases for op, cases in by_op(records).items() if op != "train_step"}
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.2 * len(ops)), squeeze=False)
    for ax, (op, cases) in zip(axes[:, 0], ops.items(), strict=True):
        labels = [_short_label(r["case"]) for r in cases]
        width = 0.8 / len(BASELINES)
        for k, baseline in enumerate(BASELINES):
            xs, ys = [], []
            for i, r in enumerate(cases):
                fused = next(iter(fused_providers(r)), None)
                if fused and baseline in r["times_s"]:
                    xs.append(i + (k - 1) * width)
                    ys.append(median_ratio(r["times_s"], baseline, fused))
            if xs:
                ax.bar(xs, ys, width=width, label=f"{baseline} / fused")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%gx"))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(cases)), labels, fontsize=6)
        ax.set_ylabel("speed-up (x)")
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"fused speed-up, median of per-round ratios: {machine_line(records)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_section(readme: str, section: str) -> str:
    """``readme`` with the text between the BEGIN and END lines replaced by ``section``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} section to replace")
    return readme[: start + len(BEGIN)] + "\n" + section + readme[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--plot", help="also write the speed-up PNG here (needs matplotlib)")
    parser.add_argument("--readme", help="replace this README's generated section with the tables")
    args = parser.parse_args()
    records = load(args.json)
    if not records:
        raise SystemExit(f"no benchmark cases in {args.json} (was it run with --benchmark-disable?)")
    text = report(records)
    print(text)
    if args.plot:
        plot(records, args.plot)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        with open(args.readme + ".tmp", "w") as f:
            f.write(replace_section(readme, text))
        os.replace(args.readme + ".tmp", args.readme)


if __name__ == "__main__":
    main()
