"""The benchmark's picture: latency CDFs, throughput bars and carod's cost curve, in one PNG.

    .venv/bin/python -m bench.plot bench/results/<time>.json [out.png]

Called by bench/__main__.py after each run (the PNG beside the JSON, and a
copy as docs/performance.png); by hand, it redraws a saved run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

ORDER = ("null", "celery", "dramatiq", "carod", "slurm")
COLOURS = {"null": "grey", "celery": "tab:green", "dramatiq": "tab:purple", "carod": "tab:blue", "slurm": "tab:red"}


def draw(run: dict[str, Any], out: Path) -> None:
    results = run["results"]
    names = [n for n in ORDER if n in results and results[n].get("latencies_ms")]
    curve = results.get("curve") or []
    panels = 3 if curve else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    cdf, bars = axes[0], axes[1]
    for name in names:
        lat = sorted(results[name]["latencies_ms"])
        cdf.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=name, color=COLOURS[name])
    cdf.set_xscale("log")
    cdf.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    cdf.xaxis.set_minor_formatter(ticker.NullFormatter())
    cdf.set_xlabel("publish to final reply, ms (log)")
    cdf.set_ylabel("fraction of sequential jobs")
    cdf.set_title("Latency CDF, seed job one at a time")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right")
    shown = [n for n in ORDER if n in results]
    rates = [results[n]["throughput_jobs_s"] for n in shown]
    labels = [f"{n}\n(burst {results[n].get('burst', run.get('burst'))})" for n in shown]
    drawn = bars.bar(labels, rates, color=[COLOURS[n] for n in shown])
    bars.bar_label(drawn, labels=[f"{r:.0f}" if r >= 10 else f"{r:.2g}" for r in rates])
    bars.set_yscale("log")
    bars.set_ylabel("jobs/s (log)")
    bars.set_title("Throughput of a burst")
    if curve:
        ax = axes[2]
        slots = [row["slots"] for row in curve]
        ax.plot(slots, [row["throughput_jobs_s"] for row in curve], "o-", color="tab:blue", label="jobs/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(slots, [str(s) for s in slots])
        ax.set_xlabel("carod slots (= [machine] Cpus)")
        ax.set_ylabel("jobs/s (burst)", color="tab:blue")
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        twin.plot(slots, [row["p50_ms"] for row in curve], "s--", color="tab:orange", label="p50 ms")
        twin.set_ylabel("p50 ms (sequential)", color="tab:orange")
        twin.set_ylim(bottom=0)
        title = "carod cost curve"
        sleep = results.get("sleep")
        if sleep:
            title += (
                f"\n{sleep['jobs']} x sleep {sleep['sleep_s']:g} on {sleep['slots']} slots: "
                f"{sleep['wall_s']:.1f} s (ideal {sleep['ideal_s']:.1f}, x{sleep['ratio']:.2f})"
            )
        ax.set_title(title)
    fig.suptitle(f"carod bench, commit {run.get('commit', '?')}, {run.get('cpus', '?')} cores")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    draw(json.loads(src.read_text()), Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png"))
