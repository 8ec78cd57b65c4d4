"""The plot of ``onnxvq report --plot``: off-chip bytes per layer, one bar per variant.

Layers are the nodes with MACs (Conv/Gemm/MatMul and their ``ai.onnxvq`` ops) that move bytes off
chip in at least one variant, in the order of the first variant, matched across variants by node
name (onnxvq keeps node names). The y axis is logarithmic when the bars span more than two decades, so that compressed layers stay visible
next to dense ones. matplotlib is imported only here (``pip install onnxvq[report]``).
"""

from __future__ import annotations

import os

from onnxvq.errors import OnnxVQError
from onnxvq.memory_access import Traffic
from onnxvq.model_io import write_atomically

__all__ = ["plot_traffic"]

_COLORS = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def plot_traffic(variants: dict[str, Traffic], path: str | os.PathLike, *, title: str) -> None:
    """Draw grouped bars of off-chip bytes per layer for ``variants`` (label -> Traffic); save a PNG
    atomically at ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise OnnxVQError("--plot needs matplotlib: pip install matplotlib (or onnxvq[report])") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    first = next(iter(variants.values()))
    by_name = {label: {r.name: r for r in t.rows} for label, t in variants.items()}
    # Layers with MACs that move bytes off chip in some variant: an attention MatMul whose operands
    # stay on chip is 0 everywhere and would only crowd the axis.
    layers = [
        r.name for r in first.rows
        if r.macs > 0 and any(rows[r.name].offchip_bytes for rows in by_name.values() if r.name in rows)
    ]
    n = len(variants)
    width = 0.8 / n
    fig_width = min(max(8.0, 0.1 * n * len(layers) + 4), 24.0)
    fig, ax = plt.subplots(figsize=(fig_width, 6.5), dpi=110)
    values_all = []
    for i, (label, rows) in enumerate(by_name.items()):
        values = [rows[name].offchip_bytes if name in rows else 0 for name in layers]
        values_all += [v for v in values if v > 0]
        total = sum(r.offchip_bytes for r in rows.values())
        time_ms = sum(r.time_s for r in rows.values()) * 1e3
        xs = [x + (i - (n - 1) / 2) * width for x in range(len(layers))]
        ax.bar(xs, values, width, color=_COLORS[i % len(_COLORS)],
               label=f"{label}: {total / 2**20:.2f} MiB off-chip, {time_ms:.2f} ms")
    if values_all and max(values_all) / max(min(values_all), 1) > 100:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7 if len(layers) > 30 else 9)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("layer (nodes with MACs and off-chip traffic, graph order)")
    ax.set_ylabel("off-chip bytes per inference (B)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3, which="both")
    # Headroom above the tallest bar for a one-row legend that covers no bar.
    if values_all:
        top = max(values_all)
        ax.set_ylim(top=top * (8 if ax.get_yscale() == "log" else 1.25))
    ax.legend(loc="upper center", ncol=n, fontsize=9)
    fig.tight_layout()

    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
