"""PNG plots of the evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def niah_heatmap(
    acc_DxL: np.ndarray, depths: Sequence[float], lengths: Sequence[int], title: str, path: str
) -> None:
    """Accuracy per needle depth (rows) and context length (columns), 0 red to 1 green."""
    acc = np.asarray(acc_DxL, float)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 1.8))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def extrapolation_curve(
    loss_T: np.ndarray, train_seq_len: int, path: str, num_bins: int = 64
) -> None:
    """Mean loss against position, averaged in log-spaced bins; a line marks the training length."""
    T = len(loss_T)
    edges = np.unique(np.geomspace(1, T + 1, num_bins).astype(int)) - 1
    mids = [0.5 * (a + b - 1) + 1 for a, b in zip(edges[:-1], edges[1:])]
    means = [float(np.mean(loss_T[a:b])) for a, b in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(mids, means, marker=".")
    ax.axvline(train_seq_len, color="gray", linestyle="--", label=f"train length {train_seq_len}")
    ax.set_xscale("log")
    ax.set_xlabel("position: tokens of context read (log scale)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Length extrapolation: loss by position")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mqar_curve(
    num_kv_pairs: Sequence[int], accuracy: Sequence[float], chance: float, title: str, path: str
) -> None:
    """Query accuracy against the number of key-value pairs."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(num_kv_pairs, accuracy, marker="o", label="model")
    ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("query accuracy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
