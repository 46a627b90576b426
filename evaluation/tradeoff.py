"""The trade-off figure: copy similarity against prompt alignment, one curve per mitigation.

Every run is placed by what its config says it did (:func:`method_of`): its mitigation (the
magnitude filter, a caption baseline, embedding noise, multiple captions, deduplication,
inference-time mitigation, or none; several at once join with ``+``) and that mitigation's
strength. Runs of one duplication setting (``data.duplication.mode``, and the count when the runs
differ in it) with two points or more form one figure, ``tradeoff_<setting>.png``: copy similarity of the duplicated
prompts (to their own training image, and the nearest-neighbour 95th percentile over the training
set) against prompt alignment (of the duplicated prompts, and of the other prompts), one line per
method ordered by strength, points labelled with it, the unmitigated run starred. Runs with the
same method and strength (other seeds) are averaged, with their standard deviation as error bars.

Beside the figures: ``tradeoff.csv`` (one row per point), ``tradeoff.json`` (points and Pareto
summary) and ``tradeoff.md`` (the Pareto summary: per method, the lowest copy similarity reached
while alignment stays >= 95% of the unmitigated run's). :func:`wandb_logs` gives W&B the full
table and a line plot per panel (a line per method).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from evaluation.report import write_json  # noqa: E402

# (y key, its description) x (x key, its description): the figure's panels, columns then rows.
COPY_KEYS = {"copy/duplicated": "copy similarity to own training image",
             "copy/nearest/duplicated/p95": "nearest-neighbour max similarity over training set, p95"}
ALIGNMENT_KEYS = {"alignment/duplicated": "alignment, duplicated prompts",
                  "alignment/other": "alignment, other prompts"}
POINT_KEYS = (*COPY_KEYS, "copy/nearest/duplicated/mean_max", "copy/other", *ALIGNMENT_KEYS)
ALIGNMENT_KEPT = 0.95  # Pareto: alignment at least this share of the unmitigated run's
UNMITIGATED = "none"
PLACEBO = " placebo"  # a method's control (filter.placebo): its name with this suffix
CAPTION_AUGMENTATIONS = ("rta", "replace", "repeat", "rta_words", "replace_caption")


def select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def caption_strength(cfg: DictConfig) -> dict[str, float]:
    return {"p": float(select(cfg, "data.captions.probability", 0.1)),
            "tokens": float(select(cfg, "data.captions.num_tokens", 2))}


# Each mitigation: its name and, from a run's config, its strength (None: not used by the run).
MITIGATIONS: tuple[tuple[str, Callable[[DictConfig], dict[str, float] | None]], ...] = (
    ("dedup", lambda c: None if select(c, "data.dedup.method", "none") == "none" else
     {"hamming": 0.0 if select(c, "data.dedup.method") == "exact" else float(select(c, "data.dedup.max_distance"))}),
    ("threshold", lambda c: {"threshold": float(select(c, "filter.threshold"))}
     if select(c, "filter.kind") == "threshold" else None),
    ("calibrated", lambda c: {"fdr": float(select(c, "filter.fdr"))}
     if select(c, "filter.kind") == "calibrated" else None),
    ("calibrated_z", lambda c: {"z": float(select(c, "filter.z"))}
     if select(c, "filter.kind") == "calibrated_z" else None),
    *((name, (lambda n: lambda c: caption_strength(c) if select(c, "data.captions.augmentation") == n else None)(name))
      for name in CAPTION_AUGMENTATIONS),
    ("multiple", lambda c: {"captions": float(select(c, "data.world.num_captions", 0) or 0)}
     if select(c, "data.captions.multiple", False) else None),
    ("embedding_noise", lambda c: {"std": float(select(c, "data.captions.embedding_noise", 0.0))}
     if float(select(c, "data.captions.embedding_noise", 0.0) or 0.0) > 0 else None),
    ("inference", lambda c: {"target": float(select(c, "eval.mitigation.target"))}
     if select(c, "eval.mitigation.enabled", False) else None),
)


def method_of(cfg: DictConfig | None, summary_filter: str | None = None) -> tuple[str, dict[str, float]]:
    """``(method, strength)`` of a run from its resolved config: ``("rta", {"p": 0.3, "tokens": 2})``,
    ``("none", {})``; without a config, the filter kind its summary names."""
    if cfg is None:
        return (summary_filter if summary_filter not in (None, "none") else UNMITIGATED), {}
    used = [(name, strength(cfg)) for name, strength in MITIGATIONS]
    used = [(name, s) for name, s in used if s is not None]
    if not used:
        return UNMITIGATED, {}
    # A placebo (filter.placebo) is a method of its own: the control its filter's points stand beside.
    placebo = PLACEBO if select(cfg, "filter.placebo", False) else ""
    return "+".join(n for n, _ in used) + placebo, \
        {f"{n}.{k}" if len(used) > 1 else k: v for n, s in used for k, v in s.items()}


def setting_of(cfg: DictConfig | None) -> tuple[str, int | None]:
    """What the runs of one figure share: duplication mode and count."""
    if cfg is None:
        return "exact", None
    copies = select(cfg, "data.duplication.copies")
    return str(select(cfg, "data.duplication.mode", "exact")), copies if isinstance(copies, int) else None


@dataclass
class Point:
    """One (setting, method, strength): the mean and standard deviation of its runs' metrics."""

    setting: str
    method: str
    strength: dict[str, float]
    runs: list[str]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    label: str = ""

    def order(self) -> tuple:
        return tuple(self.strength.values())


def strength_label(strength: dict[str, float], varying: set[str]) -> str:
    """Only the strength keys that vary within the method, ``p=0.3``; all of them when none vary."""
    keys = [k for k in strength if k in varying] or list(strength)
    if list(strength) == ["hamming"]:
        return "exact" if strength["hamming"] == 0 else f"near<={strength['hamming']:g}"
    return " ".join(f"{k}={strength[k]:g}" for k in keys)


def points_of(runs) -> list[Point]:
    """Group ``runs`` (``evaluation.compare.Run``) by setting, method and strength."""
    info = []
    for r in runs:
        path = r.directory / "config.yaml" if r.directory is not None else None
        cfg = OmegaConf.load(path) if path is not None and path.exists() else None
        info.append((r, setting_of(cfg), *method_of(cfg, r.filter)))
    counts = {s[1] for _, s, _, _ in info}
    grouped: dict[tuple, list] = {}
    for r, (mode, copies), method, strength in info:
        setting = mode if len(counts) == 1 else f"{mode}_copies{copies}"
        grouped.setdefault((setting, method, tuple(strength.items())), []).append(r)
    points = []
    for (setting, method, strength), members in grouped.items():
        p = Point(setting, method, dict(strength), [m.name for m in members])
        for key in POINT_KEYS:
            values = [m.metrics.get(key) for m in members if isinstance(m.metrics.get(key), (int, float))]
            if values:
                p.mean[key], p.std[key] = float(np.mean(values)), float(np.std(values))
        points.append(p)
    for setting, method in {(p.setting, p.method) for p in points}:
        same = [p for p in points if (p.setting, p.method) == (setting, method)]
        varying = {k for k in same[0].strength if len({p.strength.get(k) for p in same}) > 1}
        for p in same:
            p.label = strength_label(p.strength, varying)
    return sorted(points, key=lambda p: (p.setting, p.method != UNMITIGATED, p.method, p.order()))


def pareto(points: list[Point], copy_key: str, align_key: str) -> dict[str, dict]:
    """Per method of one setting: the lowest ``copy_key`` among its points whose ``align_key`` is at
    least :data:`ALIGNMENT_KEPT` of the unmitigated point's (``None`` when no point qualifies)."""
    ref = next((p for p in points if p.method == UNMITIGATED), None)
    if ref is None or align_key not in ref.mean or copy_key not in ref.mean:
        return {}
    floor = ALIGNMENT_KEPT * ref.mean[align_key]
    out = {}
    for method in dict.fromkeys(p.method for p in points):
        ok = [p for p in points if p.method == method and p.mean.get(align_key, -math.inf) >= floor
              and copy_key in p.mean]
        best = min(ok, key=lambda p: p.mean[copy_key]) if ok else None
        out[method] = {"copy": best.mean[copy_key], "alignment": best.mean[align_key], "strength": best.label,
                       "copy_change": best.mean[copy_key] - ref.mean[copy_key]} if best else None
    for method, best in out.items():  # a filter beside its placebo: the share of the copying the magnitude cut
        control = out.get(f"{method}{PLACEBO}")
        if best is not None and control is not None and ref.mean[copy_key]:
            best["attributable_cut"] = (control["copy"] - best["copy"]) / ref.mean[copy_key]
    return out


def summary_of(points: list[Point]) -> dict:
    """``{setting: {reference, points, pareto: {copy key: {alignment key: per method}}}}``."""
    out = {}
    for setting in dict.fromkeys(p.setting for p in points):
        mine = [p for p in points if p.setting == setting]
        ref = next((p for p in mine if p.method == UNMITIGATED), None)
        out[setting] = {
            "reference": ref.mean if ref else None,
            "alignment_kept": ALIGNMENT_KEPT,
            "points": [{"method": p.method, "strength": p.strength, "label": p.label, "runs": p.runs,
                        "mean": p.mean, "std": p.std} for p in mine],
            "pareto": {c: {a: pareto(mine, c, a) for a in ALIGNMENT_KEYS} for c in COPY_KEYS},
        }
    return out


def plot_setting(path: Path, setting: str, points: list[Point], axis_names: dict[str, str]) -> Path:
    """One figure: columns are the copy measures, rows the alignment measures."""
    methods = list(dict.fromkeys(p.method for p in points))
    fig, axes = plt.subplots(len(ALIGNMENT_KEYS), len(COPY_KEYS), figsize=(6.5 * len(COPY_KEYS),
                                                                           5.0 * len(ALIGNMENT_KEYS)), squeeze=False)
    ref = next((p for p in points if p.method == UNMITIGATED), None)
    for row, (xkey, xname) in enumerate(ALIGNMENT_KEYS.items()):
        for col, (ykey, yname) in enumerate(COPY_KEYS.items()):
            ax = axes[row][col]
            for i, method in enumerate(methods):
                mine = [p for p in points if p.method == method and xkey in p.mean and ykey in p.mean]
                if not mine:
                    continue
                xs, ys = [p.mean[xkey] for p in mine], [p.mean[ykey] for p in mine]
                if method == UNMITIGATED:
                    ax.scatter(xs, ys, marker="*", s=260, c="black", zorder=5, label="unmitigated")
                    continue
                colour = f"C{i % 10}"
                ax.errorbar(xs, ys, xerr=[p.std[xkey] for p in mine], yerr=[p.std[ykey] for p in mine],
                            color=colour, marker="o", ms=5, lw=1.4, capsize=2, label=method)
                for p, x, y in zip(mine, xs, ys):
                    ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=colour)
            if ref is not None and xkey in ref.mean:
                ax.axvline(ALIGNMENT_KEPT * ref.mean[xkey], color="grey", ls=":", lw=1)
            ax.set_xlabel(f"{xname} ({axis_names['alignment']}; higher: follows the prompt)", fontsize=8)
            ax.set_ylabel(f"{yname}\n({axis_names['copy']}, duplicated prompts; higher: copies)", fontsize=8)
            ax.grid(alpha=0.3)
            if row == col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"copying vs prompt alignment per mitigation, duplication mode {setting} "
                 f"(dotted: {ALIGNMENT_KEPT:.0%} of unmitigated alignment)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(path: Path, points: list[Point]) -> None:
    strength_keys = list(dict.fromkeys(k for p in points for k in p.strength))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "method", "strength", *strength_keys, "runs", *POINT_KEYS,
                         *(f"{k}/std" for k in POINT_KEYS), "run_names"])
        for p in points:
            writer.writerow([p.setting, p.method, p.label, *(p.strength.get(k) for k in strength_keys), len(p.runs),
                             *(p.mean.get(k) for k in POINT_KEYS), *(p.std.get(k) for k in POINT_KEYS),
                             " | ".join(p.runs)])


def write_markdown(path: Path, summary: dict) -> None:
    """The Pareto summary, one table per setting."""
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"Per method: the lowest copy similarity of the duplicated prompts among its strengths whose "
             f"alignment stays >= {ALIGNMENT_KEPT:.0%} of the unmitigated run's (- : none does). A filter with a "
             "placebo point (the same rule, the magnitude's link to each sample removed) also gets its attributable "
             "cut, (placebo's copy - its copy) / unmitigated copy, and methods are ranked by it (the first copy "
             "measure, alignment of the other prompts); methods without a placebo follow.", ""]
    for setting, s in summary.items():
        ref = s["reference"] or {}
        lines += [f"### duplication mode {setting}", "",
                  "unmitigated: " + ", ".join(f"{k} {fmt(ref.get(k))}" for k in (*COPY_KEYS, *ALIGNMENT_KEYS)), "",
                  "| method | strengths | attributable cut | " + " | ".join(
                      f"{c} (alignment kept on {a.split('/')[1]} prompts)" for c in COPY_KEYS for a in ALIGNMENT_KEYS)
                  + " |", "|---" * (3 + len(COPY_KEYS) * len(ALIGNMENT_KEYS)) + "|"]
        primary = s["pareto"][next(iter(COPY_KEYS))][list(ALIGNMENT_KEYS)[-1]] or {}
        methods = dict.fromkeys(p["method"] for p in s["points"])
        cuts = {m: (primary.get(m) or {}).get("attributable_cut") for m in methods}
        for method in sorted(cuts, key=lambda m: (cuts[m] is None, -(cuts[m] or 0))):
            labels = ", ".join(p["label"] for p in s["points"] if p["method"] == method)
            cells = []
            for c in COPY_KEYS:
                for a in ALIGNMENT_KEYS:
                    best = s["pareto"][c][a].get(method) if s["pareto"][c][a] else None
                    cells.append("-" if best is None else f"{fmt(best['copy'])} at {best['strength'] or '-'} "
                                                          f"(alignment {fmt(best['alignment'])})")
            cut = cuts[method]
            lines.append(f"| {method} | {labels or '-'} | {'-' if cut is None else f'{cut:.1%}'} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def write_tradeoff(out: Path, runs) -> tuple[dict[str, Path], dict]:
    """Every trade-off output for ``runs`` into ``out``; returns the PNGs by name and the summary."""
    axis_names = {kind: ", ".join(sorted({str(r.metrics.get(f"{kind}/metric")) for r in runs}))
                  for kind in ("copy", "alignment")}
    points = points_of(runs)
    summary = summary_of(points)
    pngs = {f"tradeoff_{setting}": plot_setting(out / f"tradeoff_{setting}.png", setting,
                                                [p for p in points if p.setting == setting], axis_names)
            for setting, s in summary.items() if len(s["points"]) > 1}  # one point is no trade-off
    write_csv(out / "tradeoff.csv", points)
    write_json(out / "tradeoff.json", summary)
    write_markdown(out / "tradeoff.md", summary)
    return pngs, summary


def wandb_logs(summary: dict) -> dict:
    """W&B items: per setting the full point table and, per panel, a line plot with a line per method."""
    import wandb

    logged = {}
    for setting, s in summary.items():
        columns = ["method", "strength", "runs", *POINT_KEYS]
        rows = [[p["method"], p["label"], len(p["runs"]), *(p["mean"].get(k) for k in POINT_KEYS)] for p in s["points"]]
        logged[f"tradeoff/{setting}/table"] = wandb.Table(columns=columns, data=rows)
        for xkey in ALIGNMENT_KEYS:
            for ykey in COPY_KEYS:
                lines = {}
                for p in s["points"]:
                    if xkey in p["mean"] and ykey in p["mean"]:
                        lines.setdefault(p["method"], []).append((p["mean"][xkey], p["mean"][ykey]))
                if lines:
                    name = f"{ykey}_vs_{xkey}".replace("/", ".")  # one W&B key level per setting
                    logged[f"tradeoff/{setting}/{name}"] = wandb.plot.line_series(
                        xs=[[x for x, _ in v] for v in lines.values()], ys=[[y for _, y in v] for v in lines.values()],
                        keys=list(lines), title=f"{ykey} vs {xkey} ({setting})", xname=xkey)
    return logged
