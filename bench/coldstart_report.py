"""Figures, the per-phase table and the timeline chart of ``bench/coldstart.py``."""

from __future__ import annotations

from bench.common import markdown_table
from gpu_runtime.limits import MB

HEADLINE_LINK = 100.0
COLORS = {"start+imports": "#9e9e9e", "init": "#8fbc8f", "fetch": "#4682b4",
          "load": "#daa520", "ready": "#c0c0c0", "prefill": "#cd5c5c"}


def lower_bound(model_bytes: int, pp: int, link_mb_s: float, prefill_s: float) -> float:
    """The time to move the model over ``pp`` links at once, plus one prefill."""
    return model_bytes / (pp * link_mb_s * MB) + prefill_s


def figures(raw: dict, links: tuple[float, ...]) -> dict:
    """The JSON keys: bounds per link and pp, ratios per link, and the 100 MB/s headlines."""
    out: dict = {"lower_bound_s": {}, "ratios": {}}
    for link in links:
        res = raw["runs"][f"{link:g}"]
        prefill = res["pp1"]["warm_prefill_s"]
        bounds = {name: lower_bound(raw["model_bytes"], int(name[2]), link, prefill)
                  for name in res if name.startswith("pp") and name[2:].isdigit()}
        seq = res["sequential"]["ttft"]
        out["lower_bound_s"][f"{link:g}"] = bounds | {"prefill_s": prefill}
        out["ratios"][f"{link:g}"] = {
            name: {"ttft_s": r["ttft"], "speedup_vs_sequential": seq / r["ttft"],
                   "vs_lower_bound": r["ttft"] / bounds[name[:3]]}
            for name, r in res.items() if name != "sequential"}
    head = f"{HEADLINE_LINK:g}" if HEADLINE_LINK in links else f"{min(links):g}"
    out["headline_link_mb_s"] = float(head)
    out["speedup_pp4_vs_sequential"] = out["ratios"][head]["pp4"]["speedup_vs_sequential"]
    out["pp4_vs_lower_bound"] = out["ratios"][head]["pp4"]["vs_lower_bound"]
    return out


def phase_row(name: str, r: dict) -> dict:
    """Seconds after the start of each phase's end, for one run."""
    if name == "sequential":
        t0 = r["launch"]
        return {"start+imports": r["imports_end"] - t0, "fetch end": r["download_end"] - t0,
                "load end": r["load_end"] - t0, "ready": r["load_end"] - t0,
                "prefill": r["first_token"] - r["load_end"], "ttft": r["ttft"]}
    s = r["summary"]
    return {"init end": s["init_end"], "fetch end": s["fetch_end"], "load end": s["load_end"],
            "ready": s["ready"], "prefill": s["prefill"], "ttft": r["ttft"]}


def print_report(raw: dict, keys: dict) -> None:
    rows = []
    for link, res in raw["runs"].items():
        for name, r in res.items():
            row = {"link MB/s": link, "method": name, **phase_row(name, r)}
            if name != "sequential":
                rat = keys["ratios"][link][name]
                row |= {"bound": keys["lower_bound_s"][link][name[:3]],
                        "ttft/bound": rat["vs_lower_bound"],
                        "speedup": rat["speedup_vs_sequential"]}
            rows.append(row)
    cols = ["link MB/s", "method", "start+imports", "init end", "fetch end", "load end", "ready",
            "prefill", "ttft", "bound", "ttft/bound", "speedup"]
    print(f"\ncold start of {raw['model_bytes'] / 1e9:.2f} GB (seconds after plan / launch)\n")
    print(markdown_table(rows, cols))
    print(f"\nat {keys['headline_link_mb_s']:g} MB/s: speedup_pp4_vs_sequential "
          f"{keys['speedup_pp4_vs_sequential']:.2f} (target >= 4), pp4_vs_lower_bound "
          f"{keys['pp4_vs_lower_bound']:.3f} (target <= 1.25)")


def _bars(name: str, r: dict) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """(row label, [(phase, start, end)]) rows of one run, seconds after its start."""
    if name == "sequential":
        t0 = r["launch"]
        marks = [("start+imports", t0, r["imports_end"]), ("fetch", r["imports_end"],
                 r["download_end"]), ("load", r["download_end"], r["load_end"]),
                 ("prefill", r["load_end"], r["first_token"])]
        return [(name, [(p, a - t0, b - t0) for p, a, b in marks])]
    rows = []
    for s in r["timeline"]["stages"]:
        t0 = s["plan"]
        segs = [("init", s["init_start"], s["init_end"]), ("fetch", s["fetch_start"],
                s["fetch_end"]), ("load", s["fetch_end"], max(s["load_end"], s["fetch_end"])),
                ("ready", s["load_end"], s["ready"])]
        if s["stage"] == 0:
            segs.append(("prefill", s["ready"], s["first_token"]))
        rows.append((f"{name} s{s['stage']}", [(p, a - t0, b - t0) for p, a, b in segs]))
    return rows


def plot_timeline(raw: dict, link: float, path: str) -> None:
    """Horizontal bars per run and stage at one link speed; init drawn above fetch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = raw["runs"][f"{link:g}"]
    rows = [row for name, r in res.items() for row in _bars(name, r)]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    for y, (_, segs) in enumerate(reversed(rows)):
        for phase, a, b in segs:
            low = phase == "init"  # init overlaps fetch: draw it as a thin bar on top
            ax.broken_barh([(a, max(b - a, 0.02))], (y + (0.55 if low else 0.1),
                           0.3 if low else 0.45), color=COLORS[phase])
    ax.set_yticks([y + 0.4 for y in range(len(rows))], [label for label, _ in reversed(rows)])
    ax.set_xlabel("seconds after plan (ours) / process launch (sequential)")
    ax.set_title(f"cold start, {raw['model_bytes'] / 1e9:.2f} GB bf16 Llama, {link:g} MB/s "
                 "per node")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
