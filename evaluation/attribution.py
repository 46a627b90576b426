"""What each training-time filter's cut owes to the magnitude: the filter beside its placebo.

A filter run's *copy cut* is ``1 - copy(filtered) / copy(unfiltered)`` on the duplicated prompts
(similarity of each generation to its own training image), against the unfiltered run of the
same world (same seed and data); none where the unfiltered run copies its duplicated prompts no
more than its other prompts (a ``caption_only`` world: nothing to cut). Its placebo
(``filter.placebo=true``: the same rule with each magnitude's link to its sample removed) has a
cut of its own, which the magnitude cannot have caused; the **attributable cut** is the
difference. Beside them: the samples each dropped by group (duplicated and other, by the
manifest: measurement, not what the filter knew), the other prompts' alignment against the
unfiltered run's, and what the filter knew (``filter.knew``).

Runs pair up by their resolved config: the same world (``seed`` and ``data``), the same filter
settings but for ``placebo``. Over several worlds (e.g. demos on world seeds 3, 4, 5 given to
``memsieve-compare`` together) each figure is the mean and sample standard deviation; runs that
differ in duplication count (a duplication sweep) get a row per count.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

FIGURES = ("copy_cut", "placebo_copy_cut", "attributable_cut", "dropped_duplicated", "dropped_other",
           "placebo_dropped_duplicated", "placebo_dropped_other", "alignment_other_ratio")


def run_config(run) -> dict | None:
    path = Path(run.directory) / "config.yaml" if run.directory is not None else None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path and path.exists() else None


def world_of(cfg: dict) -> str:
    return json.dumps({"seed": cfg.get("seed"), "data": cfg.get("data")}, sort_keys=True, default=str)


def filter_settings(cfg: dict) -> dict:
    """The filter's settings without ``placebo`` (a run and its placebo share them) and without a
    threshold that ``filter.choose`` picked from the run's own base model (it differs by world)."""
    filt = cfg["filter"]
    chosen = (filt.get("choose") or {}).get("quantile") is not None
    return {k: v for k, v in filt.items() if k != "placebo" and not (chosen and k == "threshold")}


def filter_identity(cfg: dict) -> str:
    return json.dumps(filter_settings(cfg), sort_keys=True, default=str)


def label_of(run, cfg: dict) -> str:
    filt = cfg["filter"]
    key = run.metrics.get("filter/key")
    return filt["kind"] + (f" [key={key}]" if key else "")


def cut(filtered: float | None, unfiltered: float | None, unfiltered_other: float | None) -> float | None:
    """``1 - filtered / unfiltered``; ``None`` where the unfiltered model copies its duplicated prompts'
    images no more than its other prompts' (``copy/gap`` <= 0: nothing to cut, and the ratio of two
    near-zero similarities is noise)."""
    if filtered is None or unfiltered is None or unfiltered <= (unfiltered_other or 0.0):
        return None
    return 1.0 - filtered / unfiltered


def per_world(runs) -> list[dict]:
    """One row per (world, filter) with a non-placebo filter run and an unfiltered run of its world."""
    configs = {id(r): run_config(r) for r in runs}
    known = [r for r in runs if configs[id(r)] is not None]
    rows = []
    for world in dict.fromkeys(world_of(configs[id(r)]) for r in known):
        mine = [r for r in known if world_of(configs[id(r)]) == world]
        unfiltered = next((r for r in mine if configs[id(r)]["filter"]["kind"] == "none"), None)
        if unfiltered is None:
            continue
        base_copy, base_align = unfiltered.metrics.get("copy/duplicated"), unfiltered.metrics.get("alignment/other")
        base_other = unfiltered.metrics.get("copy/other")
        for run in mine:
            cfg = configs[id(run)]
            if cfg["filter"]["kind"] == "none" or cfg["filter"].get("placebo"):
                continue
            placebo = next((r for r in mine if configs[id(r)]["filter"].get("placebo")
                            and filter_identity(configs[id(r)]) == filter_identity(cfg)), None)
            own, control = cut(run.metrics.get("copy/duplicated"), base_copy, base_other), None
            if placebo is not None:
                control = cut(placebo.metrics.get("copy/duplicated"), base_copy, base_other)
            align = run.metrics.get("alignment/other")
            rows.append({
                "filter": label_of(run, cfg), "run": run.name, "placebo_run": placebo.name if placebo else None,
                "unfiltered_run": unfiltered.name, "seed": cfg.get("seed"),
                "copies": (cfg.get("data") or {}).get("duplication", {}).get("copies"),
                "settings": filter_settings(cfg),
                "knew": run.metrics.get("filter/knew"),
                "copy_cut": own, "placebo_copy_cut": control,
                "attributable_cut": None if own is None or control is None else own - control,
                "dropped_duplicated": run.metrics.get("filter/dropped_fraction/duplicated"),
                "dropped_other": run.metrics.get("filter/dropped_fraction/other"),
                "placebo_dropped_duplicated": placebo.metrics.get("filter/dropped_fraction/duplicated")
                if placebo else None,
                "placebo_dropped_other": placebo.metrics.get("filter/dropped_fraction/other") if placebo else None,
                "alignment_other_ratio": align / base_align if align is not None and base_align else None,
            })
    return rows


def spread(values: list[float | None]) -> dict:
    given = [v for v in values if v is not None]
    if not given:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(given), "std": statistics.stdev(given) if len(given) > 1 else None,
            "n": len(given)}


def attribution(runs) -> dict:
    """``{"worlds": rows per world, "filters": {label: {figure: mean, std, n}, "knew": ...}}``."""
    rows = per_world(runs)
    by_count = len({json.dumps(r["copies"]) for r in rows}) > 1  # a duplication sweep: one row per count
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        # Settings that differ between runs of one filter (a sweep's strengths) name their own rows.
        same = [r["settings"] for r in rows if r["filter"] == row["filter"]]
        varying = sorted(k for k in row["settings"] if len({json.dumps(s.get(k), default=str) for s in same}) > 1)
        label = " ".join([row["filter"], *(f"{k}={row['settings'][k]}" for k in varying)])
        grouped[label + (f" copies={row['copies']}" if by_count else "")].append(row)
    filters = {label: {"knew": sorted({r["knew"] for r in group if r["knew"]}), "worlds": len(group),
                       "seeds": [r["seed"] for r in group], **{f: spread([r[f] for r in group]) for f in FIGURES}}
               for label, group in grouped.items()}
    return {"worlds": rows, "filters": filters}


def fmt(figure: dict, percent: bool = True) -> str:
    if figure["mean"] is None:
        return "-"
    mean = f"{figure['mean']:.1%}" if percent else f"{figure['mean']:.3f}"
    if figure["std"] is None:
        return mean
    return mean + (f" ± {figure['std']:.1%}" if percent else f" ± {figure['std']:.3f}")


def write_attribution(out: Path, runs) -> dict:
    """``attribution.json`` and ``attribution.md``; returns the figures (empty when no filter run pairs up)."""
    result = attribution(runs)
    (out / "attribution.json").write_text(json.dumps(result, indent=2))
    lines = ["Copy cut on the duplicated prompts against the unfiltered run of the same world; the placebo is the",
             "same filter with the magnitude's link to each sample removed; attributable = cut - placebo's cut.",
             "Mean ± sd over worlds (seeds).", "",
             "| filter | worlds (seeds) | copy cut | placebo copy cut | attributable cut | dropped dup / other | "
             "placebo dropped dup / other | other alignment / unfiltered | what it knew |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, f in result["filters"].items():
        lines.append(
            f"| {label} | {f['worlds']} ({', '.join(map(str, f['seeds']))}) | {fmt(f['copy_cut'])} | "
            f"{fmt(f['placebo_copy_cut'])} | **{fmt(f['attributable_cut'])}** | "
            f"{fmt(f['dropped_duplicated'])} / {fmt(f['dropped_other'])} | "
            f"{fmt(f['placebo_dropped_duplicated'])} / {fmt(f['placebo_dropped_other'])} | "
            f"{fmt(f['alignment_other_ratio'], False)} | {'; '.join(f['knew']) or '-'} |")
    (out / "attribution.md").write_text("\n".join(lines) + "\n")
    return result
