"""Turns pytest-benchmark JSON into the README's table (median per provider, and speed-up of fused over each).

python bench/report.py bench/results/loss.json [--plot bench/results/loss.png]
"""

import argparse
import json
from collections import defaultdict


def load(path: str) -> dict[str, dict[str, float]]:
    """{group: {provider: median seconds}}."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["provider"]] = b["stats"]["median"]
    return groups


def table(groups: dict[str, dict[str, float]]) -> str:
    lines = ["| case | provider | median ms | fused speed-up |", "|---|---|---:|---:|"]
    for group, medians in groups.items():
        fused = next((t for p, t in medians.items() if p.startswith("fused")), None)
        for provider, t in medians.items():
            speedup = f"{t / fused:.2f}x" if fused and not provider.startswith("fused") else ""
            lines.append(f"| {group} | {provider} | {t * 1e3:.3f} | {speedup} |")
    return "\n".join(lines)


def plot(groups: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = sorted({p for medians in groups.values() for p in medians})
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(groups) + 2))
    height = 0.8 / len(providers)
    for k, provider in enumerate(providers):
        ys = [i + k * height for i in range(len(groups))]
        ax.barh(ys, [m.get(provider, 0) * 1e3 for m in groups.values()], height=height, label=provider)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))], list(groups), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--plot", help="also write a PNG bar chart here (needs matplotlib)")
    args = parser.parse_args()
    groups: dict[str, dict[str, float]] = {}
    for path in args.json:
        groups.update(load(path))
    print(table(groups))
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    main()
