"""PNG plots of an evaluation: HP@k curve, precision-recall by Hamming radius, bit balance, distance histograms."""
from __future__ import annotations

import numpy as np

from rayhash import storage
from rayhash.layout import EvalDir


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(5.5, 4), dpi=110)


def _save(plt, fig, path: str) -> str:
    """Write the figure to ``path`` (local or object store) through :func:`rayhash.storage.atomic_output`."""
    fig.tight_layout()
    with storage.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_hp_curve(hp: np.ndarray, out_dir: str, baseline: np.ndarray | None = None) -> str:
    """Mean hierarchical precision HP@j for j = 1..k (and the random-codes baseline)."""
    plt, (fig, ax) = _figure()
    j = np.arange(1, len(hp) + 1)
    ax.plot(j, hp, label="rayhash codes")
    if baseline is not None:
        ax.plot(j, baseline, "--", color="grey", label="random codes")
    ax.set(xlabel="retrieved j", ylabel="mean HP@j", title="Hierarchical precision", ylim=(0, 1.02))
    ax.legend()
    return _save(plt, fig, EvalDir.of(out_dir).plot("hp_curve"))


def plot_precision_recall(precision: np.ndarray, recall: np.ndarray, out_dir: str) -> str:
    """Precision-recall (class relevance) traced by Hamming radius 0..d."""
    plt, (fig, ax) = _figure()
    ax.plot(recall, precision, marker=".")
    for r in (0, 2, 4, 8):
        if r < len(recall):
            ax.annotate(f"r={r}", (recall[r], precision[r]), fontsize=7)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall by Hamming radius", xlim=(0, 1.02),
           ylim=(0, 1.02))
    return _save(plt, fig, EvalDir.of(out_dir).plot("precision_recall"))


def plot_bit_balance(bit_means: np.ndarray, out_dir: str) -> str:
    """Per-bit mean of the ±1 codes: a balanced bit sits near 0."""
    plt, (fig, ax) = _figure()
    ax.bar(np.arange(len(bit_means)), bit_means, width=1.0)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="bit", ylabel="mean of ±1 bit", title=f"Bit balance (mean |mean| = {np.abs(bit_means).mean():.3f})",
           ylim=(-1, 1))
    return _save(plt, fig, EvalDir.of(out_dir).plot("bit_balance"))


def plot_distance_histograms(similar: np.ndarray, dissimilar: np.ndarray, bits: int, out_dir: str) -> str:
    """Hamming distance distributions of similar (same class) and dissimilar query pairs."""
    plt, (fig, ax) = _figure()
    bins = np.arange(bits + 2) - 0.5
    ax.hist(dissimilar, bins=bins, density=True, alpha=0.6, label="different class")
    ax.hist(similar, bins=bins, density=True, alpha=0.6, label="same class")
    ax.set(xlabel="Hamming distance", ylabel="density", title="Distances of similar vs dissimilar pairs")
    ax.legend()
    return _save(plt, fig, EvalDir.of(out_dir).plot("distance_histograms"))
