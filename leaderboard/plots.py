"""Layer-weight figures, as SUPERB papers draw them (matplotlib, Agg backend: no display needed).

- one heat map per upstream (and corpus/profile): tasks x layers, each row the softmax weights that the task's
  weighted sum learned (mean over the counted runs of the cell: folds, seeds);
- one line plot per task (and corpus/profile): the weights over the layers, one line per upstream.

Each figure is written as PNG and SVG. ``layer 0`` is the first hidden state the upstream exposes (for
wav2vec 2.0/HuBERT the CNN/projection output, as HF ``hidden_states`` counts).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechbench.common import atomic_write_bytes
from speechbench.leaderboard.columns import column_order


@dataclass(frozen=True)
class Figure:
    """One written figure: its title, kind (``heatmap`` | ``lines``), and the PNG and SVG paths."""

    title: str
    kind: str
    png: Path
    svg: Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small files, no glyph ids to clash
    matplotlib.rcParams["svg.hashsalt"] = "speechbench"  # deterministic ids
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def _group_label(corpus: str, profile: str) -> str:
    return f"{corpus}/{profile}" if profile else corpus


def heatmap(upstream: str, group: str, weights: dict[str, np.ndarray]):
    """Tasks (rows, paper order) x layers (columns) of one upstream; returns a matplotlib figure."""
    plt = _pyplot()
    tasks = column_order(list(weights))
    layers = max(len(w) for w in weights.values())
    grid = np.full((len(tasks), layers), np.nan)
    for i, task in enumerate(tasks):
        grid[i, : len(weights[task])] = weights[task]
    fig, ax = plt.subplots(figsize=(max(4.5, 2.0 + 0.55 * layers), 1.4 + 0.45 * len(tasks)), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(grid)), 1e-9), aspect="auto")
    ax.set_xticks(range(layers), [str(k) for k in range(layers)])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("layer")
    ax.set_title(f"layer weights of {upstream}\n({group})", fontsize=10)
    if layers * len(tasks) <= 120:
        for (i, k), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(k, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * np.nanmax(grid) else "black")
    fig.colorbar(image, ax=ax, label="softmax weight")
    return fig


def lines(task: str, group: str, weights: dict[str, np.ndarray]):
    """One task's layer weights, one line per upstream; returns a matplotlib figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.2), layout="constrained")
    for upstream in sorted(weights):
        w = weights[upstream]
        ax.plot(range(len(w)), w, marker="o", label=upstream)
    ax.set_xlabel("layer")
    ax.set_ylabel("softmax weight")
    ax.set_ylim(0.0, 1.1 * max(float(np.max(w)) for w in weights.values()))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"layer weights on {task} ({group})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _save(fig, stem: Path, title: str, kind: str) -> Figure:
    plt = _pyplot()
    paths = {}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
        paths[fmt] = stem.with_suffix(f".{fmt}")
        atomic_write_bytes(paths[fmt], buf.getvalue())
    plt.close(fig)
    return Figure(title, kind, paths["png"], paths["svg"])


def write_layer_weight_figures(cell_weights: dict[tuple, np.ndarray], out_dir: str | Path) -> list[Figure]:
    """Write every heat map and line plot for ``cell_weights`` (``{(upstream, corpus, profile, column): [L]}``,
    e.g. from :func:`leaderboard.cells.cell_layer_weights`) into ``out_dir``; return them in order."""
    out_dir = Path(out_dir)
    by_upstream: dict[tuple, dict[str, np.ndarray]] = {}
    by_task: dict[tuple, dict[str, np.ndarray]] = {}
    for (upstream, corpus, profile, column), w in cell_weights.items():
        by_upstream.setdefault((upstream, corpus, profile), {})[column] = w
        by_task.setdefault((column, corpus, profile), {})[upstream] = w
    figures = []
    for (upstream, corpus, profile), weights in sorted(by_upstream.items()):
        group = _group_label(corpus, profile)
        stem = out_dir / f"layers-{_slug(upstream)}-{_slug(group)}"
        figures.append(_save(heatmap(upstream, group, weights), stem, f"{upstream} ({group})", "heatmap"))
    order = {c: i for i, c in enumerate(column_order(sorted({k[0] for k in by_task})))}
    for (column, corpus, profile), weights in sorted(by_task.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:])):
        group = _group_label(corpus, profile)
        stem = out_dir / f"task-{_slug(column)}-{_slug(group)}"
        figures.append(_save(lines(column, group, weights), stem, f"{column} ({group})", "lines"))
    return figures
