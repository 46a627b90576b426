"""Per-sample magnitudes over a run, from its ``decisions.jsonl`` (``logging.decisions=true``).

Answers what a fixed threshold would do to a run before running it: per window of steps, the
mean magnitude of duplicated and other samples by noise band and the fraction of each above
``--threshold`` (e.g. the value ``filter.choose`` picked from the base model, in the run's
``threshold.json``), and for a filtered run the share it dropped by noise band; each duplicated
pair's own mean magnitude per window (its trajectory);
(``--exposure``) how much of the other pairs' drift comes with seeing a pair again rather than
with training as such; and (``--sweep``) what every fixed threshold would drop of each group, the
question the paper's rule stands or falls by (measured on a run that drops nothing, so it reads
the magnitudes a threshold would meet, not those of a run it had already changed).

    python bench/trajectories.py runs/demo_X/unfiltered --threshold 0.9 --window 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

BANDS = {"t<300": (0, 300), "300-700": (300, 700), "t>=700": (700, 1000)}


def load(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every logged sample: step, timestep, magnitude, kept, whether duplicated, and its pair index."""
    counts = json.loads((run_dir / "manifest.json").read_text())["counts"]
    dup_keys = sorted(counts)
    rows = {"step": [], "t": [], "magnitude": [], "keep": [], "pair": [], "seen": []}
    seen: dict[str, int] = {}
    for line in (run_dir / "decisions.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k in r["key"]:  # how often this pair was drawn before (0 the first time)
            rows["seen"].append(seen.get(k, 0))
            seen[k] = seen.get(k, 0) + 1
        rows["step"] += [r["step"]] * len(r["key"])
        rows["t"] += r["t"]
        rows["magnitude"] += r["magnitude"]
        rows["keep"] += r["keep"]
        rows["pair"] += [dup_keys.index(k) if k in counts else -1 for k in r["key"]]
    out = {k: torch.tensor(v) for k, v in rows.items()}
    out["dup"] = out["pair"] >= 0
    return out


def in_band(s: dict[str, torch.Tensor], a: int, b: int) -> torch.Tensor:
    """Samples whose timestep lies in ``[a, b)``."""
    return (s["t"] >= a) & (s["t"] < b)


def windows_table(s: dict[str, torch.Tensor], window: int, threshold: float | None) -> str:
    head = ["steps", *(f"{g} {b}" for g in ("dup", "other") for b in BANDS)]
    if threshold is not None:
        head += [f"dup > {threshold:.3f}", f"other > {threshold:.3f}"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    last = int(s["step"].max())
    for lo in range(0, last, window):
        w = (s["step"] > lo) & (s["step"] <= lo + window)
        cells = [f"{lo + 1}-{min(lo + window, last)}"]
        for sel in (s["dup"], ~s["dup"]):
            for a, b in BANDS.values():
                m = w & sel & in_band(s, a, b)
                cells.append(f"{s['magnitude'][m].mean():.3f}" if m.any() else "")
        if threshold is not None:
            for sel in (s["dup"], ~s["dup"]):
                m = w & sel
                cells.append(f"{(s['magnitude'][m] > threshold).float().mean():.1%}" if m.any() else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pair_table(s: dict[str, torch.Tensor], window: int) -> str:
    """Each duplicated pair's mean magnitude at t >= 700 per window (a per-pair trajectory)."""
    last = int(s["step"].max())
    starts = list(range(0, last, window))
    lines = ["| pair | " + " | ".join(f"<={min(lo + window, last)}" for lo in starts) + " |",
             "|---" * (len(starts) + 1) + "|"]
    for p in range(int(s["pair"].max()) + 1):
        cells = []
        for lo in starts:
            m = (s["pair"] == p) & (s["step"] > lo) & (s["step"] <= lo + window) & (s["t"] >= 700)
            cells.append(f"{s['magnitude'][m].mean():.2f}" if m.any() else "")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    m = (~s["dup"]) & (s["t"] >= 700)
    lines.append("| other (all) | " + " | ".join(
        f"{s['magnitude'][m & (s['step'] > lo) & (s['step'] <= lo + window)].mean():.2f}" for lo in starts) + " |")
    return "\n".join(lines)


def exposure_effects(s: dict[str, torch.Tensor], window: int) -> str:
    """The other pairs' drift, split: least squares of log magnitude on timestep-band (50 steps) and
    step-window effects plus the number of earlier draws of the sample's pair. Within a window pairs
    differ in how often they were drawn, which separates the two; with few draws per pair (a larger
    world) only the exposure part would go away."""
    m = (~s["dup"]) & ~s["magnitude"].isnan() & (s["magnitude"] > 0)
    t, step, seen = s["t"][m], s["step"][m], s["seen"][m].double()
    band = (t // 50).clamp(max=19)
    win = (step - 1) // window
    windows = int(win.max()) + 1
    cols = [torch.nn.functional.one_hot(win, windows).double(),
            torch.nn.functional.one_hot(band, 20).double()[:, 1:], seen[:, None]]
    coef = torch.linalg.lstsq(torch.cat(cols, dim=1), s["magnitude"][m].double().log()[:, None]).solution[:, 0]
    drift = (coef[:windows] - coef[0]).exp()
    last = win == windows - 1
    return (f"other pairs, {int(m.sum())} samples: x{float(coef[-1].exp()):.4f} per earlier draw of the pair; "
            f"training as such, same draws and timestep band: x{float(drift[-1]):.2f} from the first {window} "
            f"steps to the last (per window: {', '.join(f'{float(d):.2f}' for d in drift)}); mean earlier draws "
            f"in the last window {float(seen[last].mean()):.1f}, so x{float((coef[-1] * seen[last].mean()).exp()):.2f} "
            "there from exposure")


def sweep_table(s: dict[str, torch.Tensor], quantiles: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
                ) -> str:
    """Fraction of duplicated and other samples above each fixed threshold (set at the other samples'
    quantiles), over the whole run. The paper's targets (half the duplicated samples, at most 5% of
    the others) need a ratio of at least 10 at one threshold; the last line gives the best share of
    duplicated samples any threshold drops while it drops at most 5% of the others."""
    ok = ~s["magnitude"].isnan()
    dup, other = s["magnitude"][ok & s["dup"]], s["magnitude"][ok & ~s["dup"]]
    lines = ["| threshold | others' quantile | duplicated above | other above | ratio |", "|---|---|---|---|---|"]
    for q in quantiles:
        t = float(other.quantile(q))
        d, o = float((dup > t).float().mean()), float((other > t).float().mean())
        ratio = f"{d / o:.2f}" if o else ""
        lines.append(f"| {t:.3f} | {q:g} | {d:.1%} | {o:.1%} | {ratio} |")
    best = float((dup > float(other.quantile(0.95))).float().mean())
    bands = ", ".join(f"{name} {auc(s, ok & in_band(s, a, b)):.3f}" for name, (a, b) in BANDS.items())
    lines.append(f"\n{len(dup)} duplicated and {len(other)} other samples; per-sample AUC of the magnitude "
                 f"{auc(s, ok):.3f} (by noise band: {bands}); the most any one threshold drops of the duplicated "
                 f"samples while dropping at most 5% of the others: {best:.1%}")
    return "\n".join(lines)


def auc(s: dict[str, torch.Tensor], sel: torch.Tensor) -> float:
    """Per-sample AUC of the magnitude separating duplicated from other samples among ``sel``."""
    return float(roc_auc_score(s["dup"][sel].numpy(), s["magnitude"][sel].numpy()))


def dropped_by_band(s: dict[str, torch.Tensor]) -> str:
    """Share of each group's samples a filter dropped, by noise band: where a filtered run stopped
    training on a pair (copying is decided at high noise, where epsilon-space magnitudes are small)."""
    lines = ["| dropped | " + " | ".join(BANDS) + " |", "|---" * (len(BANDS) + 1) + "|"]
    for name, sel in (("duplicated", s["dup"]), ("other", ~s["dup"])):
        cells = [f"{float((~s['keep'][sel & in_band(s, a, b)]).float().mean()):.1%}"
                 for a, b in BANDS.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with decisions.jsonl")
    parser.add_argument("--threshold", type=float, default=None, help="report the fraction above this magnitude")
    parser.add_argument("--window", type=int, default=100, help="steps per table row")
    parser.add_argument("--pairs", action="store_true", help="also print each duplicated pair's trajectory")
    parser.add_argument("--exposure", action="store_true",
                        help="also split the other pairs' drift into exposure to the pair and training as such")
    parser.add_argument("--sweep", action="store_true",
                        help="also print what each fixed threshold would drop of duplicated and other samples")
    args = parser.parse_args()
    s = load(args.run)
    print(windows_table(s, args.window, args.threshold))
    if not s["keep"].all():
        print()
        print(dropped_by_band(s))
    if args.pairs:
        print()
        print(pair_table(s, args.window))
    if args.exposure:
        print()
        print(exposure_effects(s, args.window))
    if args.sweep:
        print()
        print(sweep_table(s))


if __name__ == "__main__":
    main()
