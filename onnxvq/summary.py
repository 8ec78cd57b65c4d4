"""What a compression did, per layer and in total.

Per layer: parameters, bytes of the dense weight at its dtype, bytes stored after (codes +
codebook), the ratio, and the weight SQNR ``10 log10(sum W^2 / sum (W - W_hat)^2)`` in dB.

Compression ratios are reported two ways:

* ``file_ratio``: input file size / output file size (set when the model went through files);
* ``literature_ratio``: the convention of the VQ papers, every floating-point parameter of the
  original model at fp32 (4 bytes) over: codes at ``log2(k)`` bits each (no byte padding) plus
  codebooks at fp16 (2 bytes per entry) plus every parameter left uncompressed at fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["LayerReport", "Summary", "format_bytes", "format_table", "sqnr_db"]


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact).

    Accumulates in float64 over blocks, so a layer of tens of millions of weights needs no
    float64 copy of itself (measured: 144 MiB of temporaries for a 24 MiB layer before).
    """
    reference, approximation = reference.reshape(-1), approximation.reshape(-1)
    signal = noise = 0.0
    step = 1 << 20
    for start in range(0, reference.size, step):
        ref = reference[start : start + step].astype(np.float64)
        err = ref - approximation[start : start + step]
        signal += float(ref @ ref)
        noise += float(err @ err)
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclasses.dataclass
class LayerReport:
    name: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    params: int
    bytes_before: int
    compressed: bool
    rule: str  # the config rule that decided (or why it stayed dense)
    method: str | None = None
    k: int | None = None
    d: int | None = None
    code_bits: int | None = None
    bytes_after: int | None = None
    sqnr_db: float | None = None
    shared_with: str | None = None  # another layer whose weight this one reuses
    output_sqnr_db: float | None = None  # on the calibration inputs (see onnxvq.tuning)
    finetune: dict | None = None  # the fine-tune bridge's numbers for this weight
    rank: int | None = None  # low-rank codebooks (lr2vq): the clustering dimension d~
    scales: bool | None = None  # per-output-channel scales stored (onnxvq.channel_scales)
    storage_note: str | None = None  # e.g. a float16 table kept float32 (onnxvq.packing)
    source: str | None = None  # what the weight was, when not a float tensor (a QDQ weight)

    @property
    def ratio(self) -> float | None:
        if not self.compressed or not self.bytes_after:
            return None
        return self.bytes_before / self.bytes_after


@dataclasses.dataclass
class Summary:
    layers: list[LayerReport]
    left_alone: list[dict]  # {"name", "op_type", "reason"} for nodes that are not candidates
    total_float_params: int  # every floating-point parameter of the original model
    literature_bytes: float  # the denominator of the literature convention (see module doc)
    input_file_bytes: int | None = None
    output_file_bytes: int | None = None
    # With calibration data: samples, held_back, mode (and fallback), quality per stage.
    calibration: dict | None = None
    # The compressed model's output against the original's (onnxvq.quality_guard.QualityCheck).
    check: Any = None
    # Conv -> BatchNormalization pairs and constant bias Adds folded into the Conv (onnxvq.conv_folding).
    batch_norms_folded: int = 0
    bias_adds_folded: int = 0
    # Classifier heads whose calibration-won classes were split off (onnxvq.class_rows.KeptRows).
    class_rows: list = dataclasses.field(default_factory=list)
    # Universal codebooks (vq4all) every node shares: content hash -> bytes stored (once).
    shared_codebooks: dict = dataclasses.field(default_factory=dict)

    @property
    def compressed_layers(self) -> list[LayerReport]:
        return [l for l in self.layers if l.compressed and l.shared_with is None]

    @property
    def bytes_before(self) -> int:
        return sum(l.bytes_before for l in self.compressed_layers)

    @property
    def bytes_after(self) -> int:
        return sum(l.bytes_after or 0 for l in self.compressed_layers)

    @property
    def layer_ratio(self) -> float | None:
        """The compressed weights' bytes before over after (a shared codebook not counted)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else None

    @property
    def layer_ratio_with_shared(self) -> float | None:
        """:attr:`layer_ratio` with the shared codebooks counted once (None without them)."""
        if not self.shared_codebooks or not self.bytes_after:
            return None
        return self.bytes_before / (self.bytes_after + sum(self.shared_codebooks.values()))

    @property
    def literature_ratio(self) -> float | None:
        if not self.literature_bytes:
            return None
        return 4.0 * self.total_float_params / self.literature_bytes

    @property
    def file_ratio(self) -> float | None:
        if not self.input_file_bytes or not self.output_file_bytes:
            return None
        return self.input_file_bytes / self.output_file_bytes

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            item = dataclasses.asdict(layer)
            item["shape"] = list(layer.shape)
            item["ratio"] = layer.ratio
            for key in ("sqnr_db", "output_sqnr_db"):
                if item[key] is not None and not math.isfinite(item[key]):
                    item[key] = str(item[key])
            layers.append(item)
        calibration = None
        if self.calibration is not None:
            calibration = dict(self.calibration)
            calibration["quality"] = {k: q.to_dict() for k, q in calibration.get("quality", {}).items()}
        return {
            "layers": layers,
            "calibration": calibration,
            "check": self.check.to_dict() if self.check is not None else None,
            "left_alone": self.left_alone,
            "batch_norms_folded": self.batch_norms_folded,
            "bias_adds_folded": self.bias_adds_folded,
            "class_rows": [k.to_dict() for k in self.class_rows],
            "totals": {
                "compressed_layers": len(self.compressed_layers),
                "compressed_params": sum(l.params for l in self.compressed_layers),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "layer_ratio": self.layer_ratio,
                "literature_ratio": self.literature_ratio,
                "input_file_bytes": self.input_file_bytes,
                "output_file_bytes": self.output_file_bytes,
                "file_ratio": self.file_ratio,
                "shared_codebook_bytes": sum(self.shared_codebooks.values()),
                "layer_ratio_with_shared_codebook": self.layer_ratio_with_shared,
            },
            "shared_codebooks": dict(self.shared_codebooks),
        }

    def format(self) -> str:
        """A plain-text table for terminals."""
        header = ("layer", "op", "params", "before", "after", "ratio", "SQNR dB", "out dB", "k", "d", "note")
        rows = []
        for l in self.layers:
            if l.compressed:
                note = f"shares {l.shared_with}" if l.shared_with else l.method
                if l.rank is not None and not l.shared_with:
                    note += f" rank {l.rank}"
                if l.scales and not l.shared_with:
                    note += " scaled"
                if l.storage_note and not l.shared_with:
                    note += f" ({l.storage_note})"
                rows.append((
                    l.name, l.op_type, f"{l.params:,}", format_bytes(l.bytes_before),
                    format_bytes(l.bytes_after) if not l.shared_with else "-",
                    f"{l.ratio:.1f}x" if l.ratio and not l.shared_with else "-",
                    f"{l.sqnr_db:.2f}" if l.sqnr_db is not None else "-",
                    f"{l.output_sqnr_db:.2f}" if l.output_sqnr_db is not None else "-",
                    str(l.k), str(l.d), note,
                ))
            else:
                rows.append((
                    l.name, l.op_type, f"{l.params:,}", format_bytes(l.bytes_before), "dense", "-", "-", "-",
                    "-", "-", f"dense: {l.rule}",
                ))
        lines = format_table(header, rows, left=(0, 1, 10))
        lines.append("")
        n = len(self.compressed_layers)
        if n:
            lines.append(
                f"compressed {n} weight(s): {format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)} "
                f"({self.layer_ratio:.1f}x)"
            )
        else:
            lines.append("no layer was compressed")
        for digest, nbytes in self.shared_codebooks.items():
            lines.append(f"universal codebook {digest[:12]}: {format_bytes(nbytes)}, shared by every vq4all layer; "
                         f"with it counted once: {format_bytes(self.bytes_after + nbytes)} "
                         f"({self.layer_ratio_with_shared:.1f}x)")
        sources: dict[str, int] = {}
        for layer in self.compressed_layers:
            if layer.source:
                sources[layer.source] = sources.get(layer.source, 0) + 1
        for source, count in sources.items():
            lines.append(f"{count} of them were {source}")
        if self.batch_norms_folded:
            lines.append(f"folded {self.batch_norms_folded} BatchNormalization node(s) into the Conv before each "
                         "(as onnxruntime does when it loads the model)")
        if self.bias_adds_folded:
            lines.append(f"folded {self.bias_adds_folded} constant bias Add node(s) into the Conv before each "
                         "(as onnxruntime does when it loads the model)")
        for kept in self.class_rows:
            lines.append(f"classifier head {kept.format()}")
        if self.literature_ratio:
            lines.append(f"model ratio, literature convention: {self.literature_ratio:.1f}x")
        if self.file_ratio:
            lines.append(
                f"file: {format_bytes(self.input_file_bytes)} -> {format_bytes(self.output_file_bytes)} "
                f"({self.file_ratio:.1f}x)"
            )
        if self.left_alone:
            lines.append(f"{len(self.left_alone)} weight-bearing node(s) left alone (see `onnxvq inspect`)")
        lines += self._calibration_lines()
        if self.check is not None and self.calibration is None:
            if self.check.quality is not None:
                lines.append(f"output check on {self.check.source}: {self.check.quality.format()}")
            elif self.check.note:
                lines.append(f"output check: not measured, {self.check.note}")
        return "\n".join(lines)

    def _calibration_lines(self) -> list[str]:
        if self.calibration is None:
            return []
        c = self.calibration
        held = f"{c['held_back']} held back for quality" if c.get("held_back") else "quality on the training samples"
        lines = [
            f"calibration: {c['samples']} sample(s), {held}; "
            f"{'data-aware' if c.get('data_aware') else 'weight-only'} encoding; fine-tune: {c['mode']}"
        ]
        if c.get("fallback"):
            lines.append(f"note: {c['fallback']}")
        for stage, quality in c.get("quality", {}).items():
            lines.append(f"  {stage + ':':<12} {quality.format()}")
        if c.get("activations"):
            a = c["activations"]
            size = f" ({format_bytes(a['parameter_bytes'])} of parameters)" if a.get("parameter_bytes") else ""
            lines.append(f"activations ({a['method']}): {a['verdict']}{size}")
        return lines


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_table(header: tuple, rows: list[tuple], left: tuple[int, ...] = (0, 1, 9)) -> list[str]:
    """Columns padded to their widest cell; the ``left`` columns left-aligned, numbers right."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return lines
