"""``onnxvq inspect``: what a model holds, as far as onnxvq is concerned.

On any model: the candidate layers (the names configs use, op, weight name, shape, params, bytes)
and the Conv/Gemm/MatMul nodes left alone with the reason. On a compressed model, also each VQ
layer with its method, k, d, the low-rank clustering dimension (``rank``, lr2vq), code bits, bits
per weight (every encoded tensor together: codes, codebook, projection, sign bits; a universal
codebook that every layer shares is listed once instead) and bytes, and
each PWLU activation with its intervals, parameter groups (1, or one per channel) and bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import onnx_ir as ir

from onnxvq import ops
from onnxvq.api import PROVENANCE_KEY
from onnxvq.candidates import find_layers, iter_nodes
from onnxvq.shared_codebook import PREFIX as SHARED_PREFIX
from onnxvq.integer_ops import convert_integer_ops
from onnxvq.weight_folding import fold_weight_chains
from onnxvq.summary import format_bytes, format_table

__all__ = ["VQLayerInfo", "inspect_model", "format_inspection"]


@dataclasses.dataclass(frozen=True)
class VQLayerInfo:
    name: str
    op_type: str
    method: str
    k: int
    d: int
    code_bits: int
    weight_shape: tuple[int, ...]
    params: int
    bytes: int  # every encoded tensor (a shared set counted for each layer using it)
    bits_per_weight: float
    rank: int | None = None  # low-rank codebooks: the clustering dimension (lr2vq's d~)
    sign_bits: bool = False  # sign-split: one stored sign bit per weight (ssvq)


def inspect_model(model: ir.Model) -> dict:
    """Candidate layers, nodes left alone and VQ layers of ``model`` as plain data (weights
    computed from constants and integer ops counted as compress counts them, in a copy)."""
    model = model.clone()
    fold_weight_chains(model)
    convert_integer_ops(model)
    layers, left_alone = find_layers(model)
    candidates = [
        {
            "name": l.name,
            "op_type": l.op_type,
            "weight": "+".join(v.name for v in l.parts) if l.parts else l.weight.name,
            "shape": list(l.weight_shape),
            "dtype": l.weight_dtype.name,
            "params": l.size,
            "bytes": l.nbytes,
            "constant_node": not l.weight.is_initializer(),
            "in_subgraph": l.node.graph is not model.graph,
        }
        for l in layers
    ]
    vq_layers = [dataclasses.asdict(info) for info in _vq_layers(model)]
    pwlu = [
        {"name": node.name or "PWLU", "input": node.inputs[0].name,
         "intervals": int(node.inputs[2].shape[0]) - 1 if node.inputs[2].shape is not None else None,
         "groups": math.prod(node.inputs[1].shape[1:]) if node.inputs[1].shape is not None else None,
         "bytes": int(sum(v.const_value.nbytes for v in node.inputs[1:] if v is not None and v.const_value is not None))}
        for node in iter_nodes(model) if node.domain == ops.DOMAIN and node.op_type == ops.pwlu.OP_TYPE
    ]
    provenance = model.metadata_props.get(PROVENANCE_KEY)
    return {
        "candidates": candidates,
        "left_alone": [dataclasses.asdict(l) for l in left_alone],
        "vq_layers": vq_layers,
        "shared_codebooks": [
            {"name": name, "shape": list(value.shape), "bytes": int(value.const_value.nbytes),
             "file": os.path.basename(value.const_value.path) if isinstance(value.const_value, ir.ExternalTensor) else None}
            for name, value in model.graph.initializers.items()
            if name.startswith(SHARED_PREFIX) and value.const_value is not None
        ],
        "pwlu": pwlu,
        "provenance": json.loads(provenance) if provenance else None,
    }


def format_inspection(info: dict) -> str:
    lines: list[str] = []
    if info["vq_layers"]:
        rows = [
            (v["name"], v["op_type"], v["method"], str(v["k"]), str(v["d"]),
             "-" if v.get("rank") is None else str(v["rank"]), str(v["code_bits"]),
             "x".join(map(str, v["weight_shape"])), f"{v['params']:,}", f"{v['bits_per_weight']:.3f}",
             format_bytes(v["bytes"]))
            for v in info["vq_layers"]
        ]
        lines.append(f"VQ layers ({len(rows)}):")
        lines += format_table(("layer", "op", "method", "k", "d", "rank", "code bits", "shape", "params", "bits/weight", "bytes"), rows)
        lines.append("")
    for shared in info.get("shared_codebooks", []):
        where = f"in {shared['file']}" if shared["file"] else "in the model"
        lines.append(f"universal codebook {shared['name']}: {'x'.join(map(str, shared['shape']))}, "
                     f"{format_bytes(shared['bytes'])} {where}, shared by every vq4all layer (not in their bytes)")
        lines.append("")
    if info.get("pwlu"):
        rows = [(p["name"], p["input"], str(p["intervals"]), str(p["groups"]), format_bytes(p["bytes"]))
                for p in info["pwlu"]]
        lines.append(f"PWLU activations ({len(rows)}):")
        lines += format_table(("node", "input", "intervals", "groups", "bytes"), rows)
        lines.append("")
    rows = [
        (c["name"], c["op_type"], c["weight"], "x".join(map(str, c["shape"])), c["dtype"],
         f"{c['params']:,}", format_bytes(c["bytes"]),
         ", ".join(t for t, on in (("Constant node", c["constant_node"]), ("subgraph", c["in_subgraph"])) if on))
        for c in info["candidates"]
    ]
    lines.append(f"candidate layers ({len(rows)}):")
    if rows:
        lines += format_table(("layer", "op", "weight", "shape", "dtype", "params", "bytes", "note"), rows)
    if info["left_alone"]:
        lines.append("")
        lines.append(f"left alone ({len(info['left_alone'])}):")
        lines += format_table(("layer", "op", "reason"), [(l["name"], l["op_type"], l["reason"]) for l in info["left_alone"]])
    return "\n".join(lines)


def _vq_layers(model: ir.Model) -> list[VQLayerInfo]:
    # A full-rank lr2vq codebook stores no projection; its rank is in the provenance record.
    provenance = json.loads(model.metadata_props.get(PROVENANCE_KEY) or "{}")
    recorded = {name: layer.get("rank") for name, layer in (provenance.get("layers") or {}).items()}
    out = []
    for node in iter_nodes(model):
        if not ops.is_weight_op(node):
            continue
        attributes = node.attributes
        names = ops.input_names(node.op_type, node.overload)
        encoded = {
            name: value.const_value
            for name, value in zip(names, node.inputs)
            if name in ("codes", "codebook", *ops.vq_weight.EXTRA_INPUTS) and value is not None
        }
        codebook, projection = encoded["codebook"], encoded.get("projection")
        shape = tuple(int(s) for s in attributes["weight_shape"].value.numpy())
        params = math.prod(shape)
        shared = node.inputs[2].name.startswith(SHARED_PREFIX)  # listed once, not per layer
        nbytes = int(sum(t.nbytes for name, t in encoded.items() if not (shared and name == "codebook")))
        out.append(
            VQLayerInfo(
                name=node.name or node.op_type,
                op_type=node.op_type,
                method=attributes["method"].value if "method" in attributes else "?",
                k=int(codebook.shape[0]),
                d=int((projection if projection is not None else codebook).shape[1]),
                code_bits=int(attributes["code_bits"].value),
                weight_shape=shape,
                params=params,
                bytes=nbytes,
                bits_per_weight=8.0 * nbytes / params,
                rank=int(projection.shape[0]) if projection is not None else recorded.get(node.name),
                sign_bits="signs" in encoded,
            )
        )
    return out
