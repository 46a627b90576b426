"""Comparison of evaluated runs: table (CSV, markdown), plots (PNG) and W&B.

``memsieve-compare DIR...`` takes run directories or multirun sweep directories (every
subdirectory holding a ``summary.json`` is a run). It writes ``comparison.csv`` (one row per
run), ``comparison.md`` (one row per metric, one column per run), ``comparison.json``,
``comparison.png`` (copy similarity against alignment, one point per run), the trade-off figures
``tradeoff_<mode>.png`` with ``tradeoff.{csv,json,md}`` (one curve per mitigation, grouped by
method and strength read from each run's config: :mod:`evaluation.tradeoff`),
``attribution.{md,json}`` (each filter's copy cut beside its placebo's and the attributable cut,
mean ± sd over worlds: :mod:`evaluation.attribution`) and, when the runs
differ in duplication count, ``duplication.png`` (memorization against duplication count, one
line per filter). All go to W&B (offline unless logged in) as tables with a scatter and line
plots. ``experiment=dup_sweep`` and ``experiment=tradeoff`` call it at the end of the sweep
through :class:`CompareSweep`.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from evaluation.attribution import write_attribution  # noqa: E402
from evaluation.report import flatten, write_json  # noqa: E402
from evaluation.tradeoff import wandb_logs, write_tradeoff  # noqa: E402
from train.tracking import wandb_mode  # noqa: E402

TABLE_KEYS = ("copy/duplicated", "copy/other", "copy/gap",
              "copy/nearest/duplicated/mean_max", "copy/nearest/duplicated/p95",
              "copy/nearest/duplicated/above_threshold", "copy/nearest/duplicated/own_is_nearest",
              "copy/nearest/other/mean_max", "copy/nearest/other/p95", "copy/nearest/other/above_threshold",
              "alignment/duplicated", "alignment/other",
              "filter/key", "filter/placebo", "filter/keys_dropped",
              "filter/dropped_fraction/duplicated", "filter/dropped_fraction/other", "timing/seconds_per_step")
# Detection rows come per setting (eval.detection.settings: the paper's first step x 1 generation
# and the first 10 steps x 4 generations by default), so runs that evaluated different settings
# (the demo's filtered runs take only the first step's) never share a row. Summaries written
# before settings were recorded have only the default setting's detection/auc ... (DETECTION_KEYS).
SETTING_KEYS = ("auc", "auc_std", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_std")
DETECTION_KEYS = tuple(f"detection/{k}" for k in SETTING_KEYS)
# What the duplication plot calls memorization: similarity to the own training image, and the
# nearest-neighbour convention when the runs have it.
MEMORIZATION_KEYS = {"copy/duplicated": "similarity to own training image",
                     "copy/nearest/duplicated/mean_max": "max similarity over the training set (mean)"}


@dataclass
class Run:
    """One evaluated run: its name in tables, directory, flattened summary and swept settings."""

    name: str
    directory: Path | None
    summary: dict
    filter: str | None = None
    copies: int | None = None
    metrics: dict = field(init=False)

    def __post_init__(self):
        self.metrics = flatten(self.summary)
        self.filter = self.filter or self.metrics.get("filter/kind")


def table_keys(runs: list[Run]) -> list[str]:
    """:data:`TABLE_KEYS`, then :data:`SETTING_KEYS` for every detection setting some run has
    (:data:`DETECTION_KEYS` when some run has no settings)."""
    settings = dict.fromkeys(k.split("/")[2] for r in runs for k in r.metrics
                             if k.startswith("detection/settings/") and k.endswith("/auc"))
    legacy = any("detection/auc" in r.metrics and not any(k.startswith("detection/settings/") for k in r.metrics)
                 for r in runs)
    return [*TABLE_KEYS, *(DETECTION_KEYS if legacy else ()),
            *(f"detection/settings/{name}/{key}" for name in settings for key in SETTING_KEYS)]


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among ``paths``: each path that has ``summary.json``, else its subdirectories that do."""
    found = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory; expected a run or sweep directory")
        if (path / "summary.json").exists():
            found.append(path)
            continue
        subs = [d for d in path.iterdir() if (d / "summary.json").exists()]
        if not subs:
            raise FileNotFoundError(f"{path} has no summary.json, nor subdirectories with one; expected an "
                                    f"evaluated run or a sweep of them")
        found += sorted(subs, key=lambda d: (len(d.name), d.name))  # sweep jobs 0, 1, ..., 10 in order
    return found


def run_settings(run_dir: Path) -> tuple[str | None, int | None]:
    """The run's filter kind and duplication count (``None`` when mixed or unknown), from its config."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None, None
    cfg = OmegaConf.load(path)
    copies = OmegaConf.select(cfg, "data.duplication.copies", default=None)
    return OmegaConf.select(cfg, "filter.kind", default=None), copies if isinstance(copies, int) else None


def run_names(dirs: list[Path]) -> list[str]:
    """Names from each run's Hydra overrides that not every run shares (``copies=40 filter=none``);
    directory names where that does not tell the runs apart."""
    overrides = []
    for d in dirs:
        path = d / ".hydra" / "overrides.yaml"
        overrides.append(yaml.safe_load(path.read_text()) if path.exists() else None)
    if all(o is not None for o in overrides):
        common = set.intersection(*(set(o) for o in overrides))
        names = [" ".join(short(o) for o in ov if o not in common) for ov in overrides]
        if all(names) and len(set(names)) == len(names):
            return names
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def short(override: str) -> str:
    """``data.duplication.copies=40`` to ``copies=40``."""
    key, _, value = override.partition("=")
    return f"{key.split('.')[-1]}={value}"


def load_runs(paths: list[Path]) -> list[Run]:
    dirs = find_runs(paths)
    return [Run(name, d, json.loads((d / "summary.json").read_text()), *run_settings(d))
            for name, d in zip(run_names(dirs), dirs)]


def write_table(out: Path, runs: list[Run]) -> None:
    """``comparison.csv`` (one row per run, for plotting tools) and ``comparison.md`` (one row per metric)."""
    keys = table_keys(runs)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "filter", "copies", *keys, "directory"])
        writer.writeheader()
        for r in runs:
            writer.writerow({"run": r.name, "filter": r.filter, "copies": r.copies, "directory": r.directory,
                             **{k: r.metrics.get(k) for k in keys}})
    fmt = lambda v: "" if v is None else str(v) if isinstance(v, str | bool | int) else f"{v:.4f}"  # noqa: E731
    lines = ["| metric | " + " | ".join(r.name for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(fmt(r.metrics.get(k)) for r in runs) + " |"
              for k in keys if any(r.metrics.get(k) is not None for r in runs)]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def axis_label(runs: list[Run], kind: str) -> str:
    """Axis title naming the metric the runs were measured with."""
    metrics = {r.metrics.get(f"{kind}/metric") for r in runs}
    return f"{kind} ({', '.join(sorted(str(m) for m in metrics))})"


def plot_tradeoff(out: Path, runs: list[Run]) -> Path:
    """Copy similarity against alignment, one point per run (filled: duplicated prompts, hollow: other)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, r in enumerate(runs):
        colour = f"C{i % 10}"
        for group, face in (("duplicated", colour), ("other", "none")):
            x, y = r.metrics.get(f"alignment/{group}"), r.metrics.get(f"copy/{group}")
            if x is not None and y is not None:
                ax.scatter(x, y, s=50, facecolors=face, edgecolors=colour,
                           label=r.name if group == "duplicated" else None)
    ax.set_xlabel(axis_label(runs, "alignment") + " (higher: follows the prompt)")
    ax.set_ylabel(axis_label(runs, "copy") + " (higher: copies)")
    ax.set_title("copying vs prompt alignment (filled: duplicated prompts, hollow: other)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def duplication_lines(runs: list[Run], key: str) -> dict[str, list[tuple[int, float]]]:
    """``{filter kind: [(duplication count, metric)]}`` sorted by count, for runs that have both."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        if r.copies is not None and r.metrics.get(key) is not None:
            lines.setdefault(str(r.filter), []).append((r.copies, r.metrics[key]))
    return {kind: sorted(points) for kind, points in lines.items()}


def is_duplication_sweep(runs: list[Run]) -> bool:
    return len({r.copies for r in runs if r.copies is not None}) > 1


def plot_duplication(out: Path, runs: list[Run]) -> Path:
    """Memorization against duplication count, one line per filter, one panel per convention."""
    keys = [k for k in MEMORIZATION_KEYS if duplication_lines(runs, k)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for kind, points in duplication_lines(runs, key).items():
            label = "unfiltered" if kind == "none" else f"filtered ({kind})"
            ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=label)
        counts = sorted({c for points in duplication_lines(runs, key).values() for c, _ in points})
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("duplication count (occurrences of each duplicated pair)")
        ax.set_ylabel(f"{MEMORIZATION_KEYS[key]}\n({axis_label(runs, 'copy')}, duplicated prompts)", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("memorization against duplication count", fontsize=10)
    fig.tight_layout()
    path = out / "duplication.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_wandb(out: Path, runs: list[Run], pngs: dict[str, Path], wandb_cfg: DictConfig, tradeoff: dict,
              attributed: dict) -> None:
    """The per-run table, a scatter of copy against alignment, the trade-off tables and lines, the
    attributable cuts and, for a sweep, memorization lines."""
    import wandb

    keys = table_keys(runs)
    columns = ["run", "filter", "copies", *keys]
    with wandb.init(project=wandb_cfg.project, entity=wandb_cfg.get("entity"), dir=str(out),
                    mode=wandb_mode(wandb_cfg.mode), name=f"{out.name}-comparison", job_type="comparison") as w:
        rows = [[r.name, r.filter, r.copies, *(r.metrics.get(k) for k in keys)] for r in runs]
        table = wandb.Table(columns=columns, data=rows)
        logged = {"comparison/table": table,
                  "comparison/tradeoff": wandb.plot.scatter(table, "alignment/duplicated", "copy/duplicated",
                                                            title="copy vs alignment (duplicated prompts)"),
                  **{f"comparison/{name}": wandb.Image(str(p)) for name, p in pngs.items()},
                  **wandb_logs(tradeoff)}
        if attributed["worlds"]:
            columns = list(attributed["worlds"][0])
            cell = lambda v: json.dumps(v, default=str) if isinstance(v, dict) else v  # noqa: E731
            logged["comparison/attribution"] = wandb.Table(
                columns=columns, data=[[cell(row[c]) for c in columns] for row in attributed["worlds"]])
        for key in MEMORIZATION_KEYS if is_duplication_sweep(runs) else ():
            lines = duplication_lines(runs, key)
            if lines:
                counts = sorted({c for points in lines.values() for c, _ in points})
                logged[f"comparison/duplication/{key}"] = wandb.plot.line_series(
                    xs=counts, ys=[[dict(p).get(c) for c in counts] for p in lines.values()], keys=list(lines),
                    title=f"{key} vs duplication count", xname="duplication count")
        w.log(logged)


def compare(out: Path, runs: list[Run], wandb_cfg: DictConfig | None) -> Path:
    """Write every output of a comparison into ``out``; return ``comparison.json``."""
    out.mkdir(parents=True, exist_ok=True)
    write_table(out, runs)
    pngs = {"tradeoff": plot_tradeoff(out, runs)}
    tradeoff_pngs, tradeoff = write_tradeoff(out, runs)
    pngs.update(tradeoff_pngs)
    if is_duplication_sweep(runs):
        pngs["duplication"] = plot_duplication(out, runs)
    attributed = write_attribution(out, runs)
    path = write_json(out / "comparison.json", {**{r.name: r.summary for r in runs},
                                                "runs": {r.name: str(r.directory) for r in runs}})
    if wandb_cfg is not None and wandb_cfg.enabled:
        log_wandb(out, runs, pngs, wandb_cfg, tradeoff, attributed)
    return path


def write_comparison(out: Path, summaries: dict[str, dict], run_dirs: list[Path], wandb_cfg: DictConfig) -> Path:
    """Compare named summaries (the demo's ``unfiltered`` and ``filtered``); return ``comparison.json``."""
    return compare(out, [Run(name, d, s, *run_settings(d)) for (name, s), d in zip(summaries.items(), run_dirs)],
                   wandb_cfg)


class CompareSweep(Callback):
    """Hydra callback: compare every run of a finished multirun in its sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        compare(sweep, load_runs([sweep]), config.logging.wandb)
        for name in ("comparison.md", "tradeoff.md"):
            print(f"[memsieve-compare] {sweep / name}\n{(sweep / name).read_text()}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="memsieve-compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or multirun sweep directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the one directory given, or their common parent)")
    parser.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                        help="W&B mode (auto: online when logged in)")
    parser.add_argument("--project", default="memsieve", help="W&B project")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.dirs)
        out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path(*common_parts(args.dirs)))
        path = compare(out, runs, OmegaConf.create({"enabled": args.wandb != "disabled", "mode": args.wandb,
                                                    "project": args.project}))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"memsieve-compare: error: {err}") from None
    print((out / "comparison.md").read_text(), end="")
    print((out / "attribution.md").read_text(), end="")
    print(path)


def common_parts(dirs: list[Path]) -> tuple[str, ...]:
    """The longest common leading path components of ``dirs`` (resolved)."""
    parts = [Path(d).resolve().parts for d in dirs]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return tuple(common)


if __name__ == "__main__":
    main()
