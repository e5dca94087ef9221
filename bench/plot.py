"""The PNG of throughput against p50/p95 latency: one point per system and variant.

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``, done by ``make bench``);
without it the plot is skipped with a printed line, the rest of the run is unaffected.
"""
from __future__ import annotations

from pathlib import Path


def points(res: dict) -> list[dict]:
    """(label, system, img/s, p50, p95) of every measured pinfer and baseline variant, at load."""
    out = []
    for bench, system in (("e2e", "pinfer, 1 worker, 16 clients"), ("baseline", "Flask baseline, 8 clients")):
        for name, v in (((res.get("benchmarks") or {}).get(bench) or {}).get("variants") or {}).items():
            fig = v.get("figures") or {}
            if v.get("status", "ok") == "ok" and fig.get("images_per_s") and fig.get("loaded_p50"):
                out.append({"label": name, "system": system, "rate": fig["images_per_s"],
                            "p50": fig["loaded_p50"], "p95": fig.get("loaded_p95")})
    return out


def plot(res: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  SKIP plot: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    pts = points(res)
    if not pts:
        print("  SKIP plot: no end-to-end figures in this run")
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for system, marker in (("pinfer, 1 worker, 16 clients", "o"), ("Flask baseline, 8 clients", "s")):
        mine = [p for p in pts if p["system"] == system]
        if not mine:
            continue
        line = ax.scatter([p["rate"] for p in mine], [p["p50"] for p in mine], marker=marker, label=f"{system}: p50")
        ax.scatter([p["rate"] for p in mine], [p["p95"] for p in mine], marker=marker, facecolors="none",
                   edgecolors=line.get_facecolor(), label=f"{system}: p95")
        for p in mine:
            ax.vlines(p["rate"], p["p50"], p["p95"], colors=line.get_facecolor(), alpha=0.4)
            ax.annotate(p["label"], (p["rate"], p["p50"]), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xlabel("throughput (images/s, one core)")
    ax.set_ylabel("latency under that load (ms)")
    m = res.get("meta", {})
    ax.set_title(f"pinfer vs the seed design, {m.get('started', '')[:10]} {m.get('git', '')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
