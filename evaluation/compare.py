"""Side-by-side comparison of evaluated runs: JSON, markdown/CSV table, PNG, and W&B."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from evaluation.report import flatten, write_json  # noqa: E402
from train.tracking import wandb_mode  # noqa: E402

TABLE_KEYS = ("copy/duplicated", "copy/other", "copy/ratio", "alignment/duplicated", "alignment/other",
              "detection/auc", "detection/tpr_at_1pct_fpr", "filter/dropped_fraction/duplicated",
              "filter/dropped_fraction/other", "timing/seconds_per_step")


def comparison_rows(summaries: dict[str, dict]) -> list[dict]:
    flat = {name: flatten(s) for name, s in summaries.items()}
    return [{"metric": k, **{name: f.get(k) for name, f in flat.items()}} for k in TABLE_KEYS]


def write_table(out: Path, rows: list[dict]) -> None:
    names = [k for k in rows[0] if k != "metric"]
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["metric", *names])
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {r['metric']} | " + " | ".join(fmt(r[n]) for n in names) + " |" for r in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows: list[dict]) -> Path:
    names = [k for k in rows[0] if k != "metric"]
    shown = [r for r in rows if r["metric"] not in ("copy/ratio", "timing/seconds_per_step")]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(shown))], [r[name] or 0 for r in shown], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(shown))])
    ax.set_xticklabels([r["metric"].replace("filter/dropped_fraction/", "dropped\n").replace("/", "\n", 1)
                        for r in shown], fontsize=7)
    ax.legend()
    ax.set_title("memsieve: unfiltered vs filtered")
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(out: Path, summaries: dict[str, dict], run_dirs: list[Path], wandb_cfg: DictConfig) -> Path:
    """Write ``comparison.json`` (summaries by run name) with table and PNG; return the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(summaries)
    write_table(out, rows)
    png = plot(out, rows)
    path = write_json(out / "comparison.json", {**summaries, "runs": {n: str(d) for n, d in zip(summaries, run_dirs)}})
    if wandb_cfg.enabled:
        import wandb

        with wandb.init(project=wandb_cfg.project, entity=wandb_cfg.get("entity"), dir=str(out),
                        mode=wandb_mode(wandb_cfg.mode), name=f"{out.name}-comparison", job_type="comparison") as r:
            r.log({"comparison/table": wandb.Table(columns=list(rows[0]), data=[list(x.values()) for x in rows]),
                   "comparison/plot": wandb.Image(str(png))})
    return path
