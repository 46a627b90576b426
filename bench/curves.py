"""Training curves of runs from their ``metrics.jsonl``: loss and magnitudes against step.

Shows whether a run has converged (the base model: loss and magnitudes flat) and how the
duplicated pairs' magnitudes move against the other pairs' during a fine-tune. Prints a
Markdown table (every ``--every`` steps: the loss and each group's mean magnitude over all
timesteps, t < 500 and t >= 500, over the logging window ending at that step) and writes one
PNG with a loss panel and a magnitude panel.

    python bench/curves.py runs/embedded_base --every 500 --out bench/results/embedded_base_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BANDS = ("all", "t<500", "t>=500")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"curves: {run_dir} has no metrics.jsonl; expected a memsieve-train run directory")
    return [json.loads(line) for line in path.read_text().splitlines()]


def groups(rows: list[dict]) -> list[str]:
    """The sample groups the run logged magnitudes for (``other`` always, ``duplicated`` when present)."""
    return [g for g in ("duplicated", "other") if any(not math.isnan(r.get(f"magnitude/{g}/all", math.nan))
                                                     for r in rows)]


def table(name: str, rows: list[dict], every: int) -> str:
    names = groups(rows)
    head = ["step", "lr", "loss", *(f"{g} {b}" for g in names for b in BANDS)]
    lines = [f"**{name}**", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        if r["step"] % every == 0 or r is rows[-1]:
            cells = [str(r["step"]), f"{r['lr']:.2e}", f"{r['loss']:.4f}",
                     *(f"{r[f'magnitude/{g}/{b}']:.3f}" for g in names for b in BANDS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    fig, (loss_ax, mag_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, rows) in enumerate(runs.items()):
        steps = [r["step"] for r in rows]
        loss_ax.plot(steps, [r["loss"] for r in rows], color=f"C{i}", label=name)
        for g, style in zip(groups(rows), ("-", "--")):
            for b, alpha in zip(BANDS, (1.0, 0.6, 0.35)):
                mag_ax.plot(steps, [r[f"magnitude/{g}/{b}"] for r in rows], style, color=f"C{i}", alpha=alpha,
                            label=f"{name} {g} {b}")
    loss_ax.set(xlabel="step", ylabel="training loss (logging window mean)", yscale="log", title="loss")
    mag_ax.set(xlabel="step", ylabel="magnitude ||eps_c - eps_u||", title="training-time magnitude")
    loss_ax.legend(fontsize=7)
    mag_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--every", type=int, default=500, help="table rows every this many steps")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    runs = {d.name: records(d) for d in args.runs}
    for name, rows in runs.items():
        print(table(name, rows, args.every), end="\n\n")
    plot(runs, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
