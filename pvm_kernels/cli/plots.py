"""PNG plots of the CLI (matplotlib, headless Agg backend, imported only when plotting)."""
from __future__ import annotations

from typing import Dict, List, Sequence

from .common import CLIError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CLIError("matplotlib is needed for the PNG plot: pip install 'pvm-kernels[cli]' "
                       "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_visual_share(path: str, generated: Sequence[int], shares: Dict[str, List[float]],
                      mean: List[float], fit: List[float], fit_label: str,
                      pvm_mass: Dict[str, List[float]], title: str) -> None:
    """Self-attention visual share per layer vs generated length, its mean, the 1/length fit
    and the PVM retrieval's visual mass, in one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for name, values in shares.items():
        ax.plot(generated, values, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot([], [], color="tab:blue", alpha=0.25, linewidth=0.8, label="self-attention, each layer")
    ax.plot(generated, mean, color="tab:blue", linewidth=2.2, label="self-attention, mean of layers")
    ax.plot(generated, fit, color="black", linestyle="--", linewidth=1.2, label=fit_label)
    for k, (name, values) in enumerate(pvm_mass.items()):
        ax.plot(generated, values, color="tab:red", linewidth=1.8, alpha=0.9,
                label="PVM retrieval (" + ", ".join(pvm_mass) + ")" if k == 0 else None)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("attention mass on visual tokens")
    ax.set_ylim(0, 1.08)
    ax.set_xlim(generated[0], generated[-1])
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bench(path: str, rows: List[dict], title: str) -> None:
    """Grouped bars of median ms (log scale): one panel per op, groups = mode and shape,
    one bar per backend."""
    plt = _pyplot()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 2.6 * len(ops) + 0.6), dpi=110, squeeze=False)
    width = 0.8 / len(backends)
    for ax, op in zip(axes[:, 0], ops):
        groups = list(dict.fromkeys(r["case"] for r in rows if r["op"] == op))
        for j, backend in enumerate(backends):
            times = {r["case"]: r["median_ms"] for r in rows if r["op"] == op and r["backend"] == backend}
            xs = [i + (j - (len(backends) - 1) / 2) * width for i, g in enumerate(groups) if g in times]
            ax.bar(xs, [times[g] for g in groups if g in times], width, label=backend)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(op, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(backends))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
