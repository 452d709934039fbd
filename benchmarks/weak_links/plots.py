"""The plots: per regime, decode-heavy tokens/s against the bound, and mixed TPOT p99."""

from __future__ import annotations

from pathlib import Path

from benchmarks.weak_links.report import RESULTS, find
from benchmarks.weak_links.systems import SYSTEMS, Setting


def write_plots(results, bounds, stem: str) -> list[Path]:
    """Per regime: decode-heavy tokens/s per setting and system (bound as a line), and mixed
    TPOT p99 where the mixed workload ran. Skipped when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plots "
              "(pip install matplotlib to get them)", flush=True)
        return []
    written = []
    for regime in dict.fromkeys(s.regime for s in bounds):
        settings = [s for s in bounds if s.regime == regime]
        mixed = [s for s in settings if any(r.setting == s and r.workload == "mixed" and r.ok
                                            for r in results)]
        keys = list(dict.fromkeys(r.system.key for r in results if r.setting.regime == regime))
        fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(settings)), 8))
        def throughput(s, k):
            r = find(results, s, k, "decode")
            return r.throughput if r else 0.0

        _bars(axes[0], settings, keys, throughput)
        for i, s in enumerate(settings):
            axes[0].hlines(bounds[s].value, i - 0.45, i + 0.45, colors="k",
                           label="bound" if i == 0 else None)
        top = max([bounds[s].value for s in settings] + [
            r.throughput for r in results if r.setting.regime == regime and r.workload == "decode"])
        axes[0].set_ylim(0, 1.4 * top)  # room for the legend above the bars
        axes[0].set_title(f"{regime}: decode-heavy output tokens/s")
        axes[0].legend(fontsize=6, ncol=2)

        def tpot_p99(s, k):
            r = find(results, s, k, "mixed")
            return r.tpot[1] * 1e3 if r and r.tpot else 0.0

        _bars(axes[1], mixed, keys, tpot_p99)
        axes[1].set_title(f"{regime}: mixed TPOT p99 ms")
        fig.tight_layout()
        path = RESULTS / f"{stem}_{regime}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _bars(ax, settings: list[Setting], keys: list[str], value) -> None:
    width = 0.9 / max(1, len(keys))
    for k_index, key in enumerate(keys):
        xs = [i - 0.45 + (k_index + 0.5) * width for i in range(len(settings))]
        ax.bar(xs, [value(s, key) for s in settings], width, label=SYSTEMS[key].label)
    ax.set_xticks(range(len(settings)), [f"{s.num_stages} stages\n{s.link}" for s in settings],
                  fontsize=7)
