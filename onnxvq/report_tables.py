"""Text and JSON forms of ``onnxvq report``: the per-layer table and the variant comparison."""

from __future__ import annotations

from onnxvq.memory_access import Traffic
from onnxvq.summary import format_bytes, format_table

__all__ = ["VARIANT_LABELS", "comparison", "format_comparison", "format_layers"]

VARIANT_LABELS = {"baseline": "original", "int8": "int8 weights", "model": "this model"}


def _si(n: float) -> str:
    """A count with an SI prefix: 1.25 G."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_layers(traffic: Traffic) -> str:
    """Per-node table: layers with MACs, and other nodes only where they move at least 1 KiB off
    chip (the many small constants, LayerNorm scales and shapes, would drown the table; they are
    in the totals)."""
    shown = [r for r in traffic.rows if r.macs or r.offchip_bytes >= 1024]
    rows = [
        (r.name, r.op_type, _si(r.macs), format_bytes(r.weight_total),
         format_bytes(r.activation_read + r.activation_written), format_bytes(r.offchip_bytes),
         f"{r.time_s * 1e6:.1f}", r.bound)
        for r in shown
    ]
    header = ("layer", "op", "MACs", "weights", "activations", "off-chip", "time (us)", "bound")
    lines = format_table(header, rows)
    hidden = [r for r in traffic.rows if r not in shown]
    if hidden:
        moved = format_bytes(sum(r.offchip_bytes for r in hidden))
        lines.append(f"({len(hidden)} other node(s) without MACs: {moved} off chip in total)")
    return "\n".join(lines)


def comparison(variants: dict[str, Traffic]) -> list[dict]:
    """Totals per variant (``baseline``, ``int8``, ``model``) with speedups vs int8 and baseline."""
    int8_time = variants["int8"].total("time_s")
    base_time = variants["baseline"].total("time_s") if "baseline" in variants else None
    out = []
    for label, t in variants.items():
        totals = t.totals
        time_s = totals["time_s"]
        out.append({
            "variant": label,
            "weight_bytes": totals["weight_total"],
            "offchip_bytes": totals["offchip_bytes"],
            "macs": totals["macs"],
            "time_s": time_s,
            "speedup_vs_int8": int8_time / time_s if time_s else None,
            "speedup_vs_baseline": base_time / time_s if base_time and time_s else None,
        })
    return out


def format_comparison(variants: dict[str, Traffic]) -> str:
    rows = [
        (VARIANT_LABELS[c["variant"]], format_bytes(c["weight_bytes"]), format_bytes(c["offchip_bytes"]),
         _si(c["macs"]), f"{c['time_s'] * 1e3:.4g}",
         f"{c['speedup_vs_int8']:.2f}x" if c["speedup_vs_int8"] else "-",
         f"{c['speedup_vs_baseline']:.2f}x" if c["speedup_vs_baseline"] else "-")
        for c in comparison(variants)
    ]
    header = ("variant", "weights", "off-chip", "MACs", "time (ms)", "vs int8", "vs original")
    return "\n".join(format_table(header, rows))
