"""VQLSTM, VQGRU, VQRNN: recurrent ops whose input and recurrence weights are VQ-encoded.

Math: the original op (``LSTM``/``GRU``/``RNN``, every attribute carried over: direction,
hidden_size, activations and their alpha/beta, clip, input_forget, linear_before_reset, layout)
run on ``W`` and ``R`` rebuilt from one encoded weight, the recurrent layout of
``onnxvq.layout`` (:func:`onnxvq.layout.join_recurrent`):

    V = concat(W, R, axis=-1)              (D, G*H, I + H)
    W = V[..., :I],  R = V[..., I:]        I = V.shape[-1] - H,  H = V.shape[1] / G

with D directions, G gates (4 for LSTM, 3 for GRU, 1 for RNN), hidden size H and input size I.
Each row of ``V`` is one gate unit of one direction; it dots with ``[x_t; h_{t-1}]``, so the rows
are the outputs and per-row scales are per gate unit. ``V`` is decoded by
``onnxvq.ops.vq_weight.decode_weight`` (never transposed, two row axes).

Inputs: ``X``, ``codes``, ``codebook``, the variant's extras (``projection``, ``signs``,
``scales``), then the original's optional inputs in its order (``B``, ``sequence_lens``,
``initial_h``, and for LSTM ``initial_c`` and ``P``). Outputs: the original's (``Y``, ``Y_h``,
and for LSTM ``Y_c``). Attributes: the original's, plus ``weight_shape``, ``weight_dtype``,
``code_bits``, ``method``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx.reference.op_run import OpRun

from onnxvq.layout import split_recurrent
from onnxvq.ops import vq_weight

__all__ = ["GRU", "LSTM", "RNN", "RecurrentOp"]

# Attribute name -> its type in the ONNX text format of attribute references.
_ATTRIBUTE_TYPES = {
    "activation_alpha": "floats",
    "activation_beta": "floats",
    "activations": "strings",
    "clip": "float",
    "direction": "string",
    "hidden_size": "int",
    "input_forget": "int",
    "linear_before_reset": "int",
}
_LAYOUT_OPSET = 14  # the layout attribute exists from opset 14


@dataclasses.dataclass(frozen=True)
class RecurrentOp:
    """One recurrent op form; an instance has the interface of an op module (``OP_TYPE``,
    ``CONSUMER``, ``weight_view``, ``input_names``, ``decode``, ``function``, ``CASES``, ...)."""

    CONSUMER: str
    gates: int
    optional_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    own_attributes: tuple[str, ...]
    CASES: tuple = ()

    @property
    def OP_TYPE(self) -> str:  # noqa: N802 (the op-module interface)
        return f"VQ{self.CONSUMER}"

    @property
    def CONSUMER_ATTRIBUTES(self) -> tuple[str, ...]:  # noqa: N802
        return (*self.own_attributes, "layout")

    def weight_view(self, weight_shape, attributes: dict) -> tuple[bool, int]:
        """(transposed, row_axes): rows are the (direction, gate unit) pairs."""
        return False, 2

    def is_transposed(self, attributes: dict) -> bool:
        return False

    def input_vectors(self, acts, weight_shape, attributes: dict, select) -> np.ndarray:
        """What each direction's gate rows dot with: ``[x_t; h_(t-1)]`` at every (step, batch)
        position, rebuilt from ``acts = (X, Y[, initial_h])`` (the op's input sequence, its
        output hidden states, and its initial state, zeros when absent). Forward directions take
        ``h`` of the step before, reverse ones of the step after. Steps past a sequence's
        ``sequence_lens`` are included as they are (Y is zero there).

        ``select(total)`` picks which of the ``total`` = steps x batch positions to return.
        Returns (n, D, I + H): one group per direction (``onnxvq.layout``: the rows of
        direction ``j`` are the ``j``-th block of ``G*H`` rows).
        """
        x, y, *rest = acts
        directions, _, width = (int(s) for s in weight_shape)
        if attributes.get("layout", 0) == 1:  # batch first: (B, S, I), (B, S, D, H), (B, D, H)
            x, y = np.swapaxes(x, 0, 1), np.transpose(y, (1, 2, 0, 3))
            rest = [np.swapaxes(h, 0, 1) for h in rest]
        steps, batch, _ = x.shape
        hidden = y.shape[-1]
        h0 = rest[0] if rest else np.zeros((directions, batch, hidden), y.dtype)
        direction = attributes.get("direction", "forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        reverse = [direction == "reverse"] if directions == 1 else [False, True]
        chosen = select(steps * batch)
        t, b = np.divmod(chosen, batch)
        groups = []
        for d, backwards in enumerate(reverse):
            previous = np.concatenate([y[1:, d], h0[d][None]]) if backwards else np.concatenate([h0[d][None], y[:-1, d]])
            groups.append(np.concatenate([x[t, b], previous[t, b]], axis=-1))
        vectors = np.stack(groups, axis=1)
        if vectors.shape[-1] != width:
            raise ValueError(f"input size {x.shape[-1]} + hidden size {hidden} != the weight's {width} columns")
        return vectors

    def input_names(self, variant: vq_weight.Variant) -> list[str]:
        return ["X", *vq_weight.encoded_inputs(variant), *self.optional_inputs]

    def decode(self, codes: np.ndarray, codebook: np.ndarray, **named) -> np.ndarray:
        """The dense joined weight ``V`` (D, G*H, I+H) this node stands for."""
        extras, attributes = vq_weight.split_extras(named)
        return vq_weight.weight_from_attributes(codes, codebook, attributes, transposed=False, **extras)

    def split(self, joined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``V -> (W, R)``."""
        return split_recurrent(joined, joined.shape[1] // self.gates)

    def function(self, variant: vq_weight.Variant, opset: int) -> onnx.FunctionProto:
        names = [a for a in self.own_attributes] + (["layout"] if opset >= _LAYOUT_OPSET else [])
        refs = vq_weight.attribute_refs(names, _ATTRIBUTE_TYPES, "int")
        consumer = [
            "rnn_two = Constant <value = int64[1] {2}> ()",
            f"rnn_gates = Constant <value = int64[1] {{{self.gates}}}> ()",
            "rnn_rows = Gather <axis = 0> (wshape, one)",
            "rnn_hidden = Div (rnn_rows, rnn_gates)",
            "rnn_width = Gather <axis = 0> (wshape, rnn_two)",
            "rnn_input = Sub (rnn_width, rnn_hidden)",
            "W_in = Slice (w, zero, rnn_input, rnn_two)",
            "R_in = Slice (w, rnn_input, rnn_width, rnn_two)",
            f"{', '.join(self.outputs)} = {self.CONSUMER} <{refs}> "
            f"(X, W_in, R_in, {', '.join(self.optional_inputs)})",
        ]
        return vq_weight.make_function(
            op_type=self.OP_TYPE, variant=variant, opset=opset, inputs=self.input_names(variant),
            attributes=names, consumer="\n  ".join(consumer), outputs=self.outputs,
        )

    def reference_op(self) -> type:
        """The ``onnx.reference`` kernel: numpy decode, split, then onnx's own reference op."""
        op = self

        def _run(self, X, codes, codebook, *rest, **attributes):
            extras, rest = vq_weight.split_inputs(self.onnx_node.overload, rest)
            W, R = op.split(op.decode(codes, codebook, **extras, **attributes))
            own = {a: attributes[a] for a in op.CONSUMER_ATTRIBUTES if attributes.get(a) is not None}
            opset = _LAYOUT_OPSET if "layout" in own else 13
            return tuple(vq_weight.run_standard_op(op.CONSUMER, [X, W, R, *rest], own, len(self.onnx_node.output), opset))

        return type(self.OP_TYPE, (OpRun,), {"op_domain": vq_weight.DOMAIN, "_run": _run})


_COMMON = ("activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size")

LSTM = RecurrentOp(
    CONSUMER="LSTM", gates=4,
    optional_inputs=("B", "sequence_lens", "initial_h", "initial_c", "P"),
    outputs=("Y", "Y_h", "Y_c"), own_attributes=(*_COMMON, "input_forget"),
)
GRU = RecurrentOp(
    CONSUMER="GRU", gates=3, optional_inputs=("B", "sequence_lens", "initial_h"),
    outputs=("Y", "Y_h"), own_attributes=(*_COMMON, "linear_before_reset"),
)
RNN = RecurrentOp(
    CONSUMER="RNN", gates=1, optional_inputs=("B", "sequence_lens", "initial_h"),
    outputs=("Y", "Y_h"), own_attributes=_COMMON,
)
