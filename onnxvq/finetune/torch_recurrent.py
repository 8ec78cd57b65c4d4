"""LSTM, GRU and RNN for :mod:`onnxvq.finetune.torch_graph`: the ONNX definitions in torch.

Written out step by step rather than through ``torch.nn.LSTM``/``GRU``/``RNN``, because those
cannot express what ONNX allows (per-direction activations with alpha/beta, ``clip``,
``input_forget``, peepholes, GRU's ``linear_before_reset=0``, per-sequence ``sequence_lens``) and
their gate order differs; the loop over time steps is what they run on CPU too.

With ``layout=0``: X (S, B, I), W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H) = [Wb; Rb], initial
states (D, B, H), Y (S, D, B, H), Y_h and Y_c (D, B, H); ``layout=1`` puts the batch first (X
(B, S, I), Y (B, S, D, H), states (B, D, H)). Gates, with ``f, g, h`` the activations
(defaults Sigmoid, Tanh, Tanh) and ``clip`` applied to every gate's pre-activation:

* LSTM (gates i, o, f, c): i = f(W_i x + R_i h + P_i c' + b_i), f_ = f(... + P_f c' + b_f)
  (``1 - i`` with ``input_forget``), c~ = g(W_c x + R_c h + b_c), c = f_ c' + i c~,
  o = f(W_o x + R_o h + P_o c + b_o), h = o h(c);
* GRU (gates z, r, h): z = f(...), r = f(...), h~ = g(W_h x + R_h (r h) + Rb_h + Wb_h), or with
  ``linear_before_reset`` g(W_h x + r (R_h h + Rb_h) + Wb_h); h = (1 - z) h~ + z h';
* RNN: h = f(W x + R h' + b), default Tanh.

A reverse direction runs each sequence backwards from its own last step (``sequence_lens``);
steps past a sequence's length output zeros and leave its state unchanged.
"""

from __future__ import annotations

import torch

from onnxvq.finetune.torch_graph import Tensor, _op, _opt

__all__: list[str] = []

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _activation(name: str, alphas: list, betas: list):
    """An ONNX recurrent activation by name; those with parameters take the next alpha/beta."""
    name = name.lower()
    simple = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
              "softsign": lambda x: x / (1 + x.abs()), "softplus": torch.nn.functional.softplus}
    if name in simple:
        return simple[name]
    alpha = float(alphas.pop(0)) if alphas else None
    if name == "hardsigmoid":
        beta = float(betas.pop(0)) if betas else 0.5
        alpha = 0.2 if alpha is None else alpha
        return lambda x: torch.clamp(alpha * x + beta, 0, 1)
    if name == "leakyrelu":
        return lambda x: torch.nn.functional.leaky_relu(x, 0.01 if alpha is None else alpha)
    if name == "thresholdedrelu":
        threshold = 1.0 if alpha is None else alpha
        return lambda x: torch.where(x > threshold, x, torch.zeros_like(x))
    if name == "elu":
        return lambda x: torch.nn.functional.elu(x, 1.0 if alpha is None else alpha)
    if name in ("scaledtanh", "affine"):
        beta = float(betas.pop(0)) if betas else 1.0
        a = 1.0 if alpha is None else alpha
        return (lambda x: a * torch.tanh(beta * x)) if name == "scaledtanh" else (lambda x: a * x + beta)
    raise ValueError(f"recurrent activation {name!r} is not supported")


@_op("LSTM", "GRU", "RNN")
def _recurrent(inputs, attrs, opset):
    kind = attrs["_op_type"]
    x, w, r = inputs[0], inputs[1], inputs[2]
    bias, lengths, h0 = _opt(inputs, 3), _opt(inputs, 4), _opt(inputs, 5)
    c0 = _opt(inputs, 6) if kind == "LSTM" else None
    peep = _opt(inputs, 7) if kind == "LSTM" else None
    batch_first = int(attrs.get("layout", 0)) == 1
    if batch_first:
        x = x.transpose(0, 1)
        h0 = h0.transpose(0, 1) if h0 is not None else None
        c0 = c0.transpose(0, 1) if c0 is not None else None
    steps, batch, _ = x.shape
    directions, gate_rows, _ = w.shape
    hidden = gate_rows // _GATES[kind]
    direction = attrs.get("direction", "forward")
    backwards = [direction == "reverse"] if directions == 1 else [False, True]
    names = list(attrs.get("activations") or _DEFAULT_ACTIVATIONS[kind] * directions)
    per_direction = len(names) // directions
    alphas, betas = list(attrs.get("activation_alpha") or []), list(attrs.get("activation_beta") or [])
    activations = [_activation(n, alphas, betas) for n in names]
    clip = attrs.get("clip")
    lengths = lengths.to(torch.int64) if lengths is not None else torch.full((batch,), steps, dtype=torch.int64)
    ys, last_h, last_c = [], [], []
    for d, reverse in enumerate(backwards):
        fns = activations[d * per_direction : (d + 1) * per_direction]
        wb, rb = (bias[d, :gate_rows], bias[d, gate_rows:]) if bias is not None else (None, None)
        order = _time_order(steps, lengths, reverse)  # (S, B): the source step of each step
        xs = torch.gather(x, 0, order[:, :, None].expand(-1, -1, x.shape[-1]))
        pre = xs @ w[d].T + (wb if wb is not None else 0)  # input part of every gate, all steps
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
        outputs = []
        for t in range(steps):
            live = (t < lengths)[:, None]
            new_h, new_c = _step(kind, pre[t], h, c, r[d], rb, peep[d] if peep is not None else None,
                                 fns, clip, attrs)
            h = torch.where(live, new_h, h)
            c = torch.where(live, new_c, c) if new_c is not None else c
            outputs.append(torch.where(live, new_h, torch.zeros_like(new_h)))
        y = torch.stack(outputs)
        ys.append(torch.gather(y, 0, _inverse(order)[:, :, None].expand(-1, -1, hidden)))
        last_h.append(h)
        last_c.append(c)
    y, y_h, y_c = torch.stack(ys, 1), torch.stack(last_h), torch.stack(last_c)
    if batch_first:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    return [y, y_h, y_c][: attrs["_n_outputs"]]


def _time_order(steps: int, lengths: Tensor, reverse: bool) -> Tensor:
    """(S, B) source step of each processed step: t, or for a reverse direction len - 1 - t within
    each sequence's length (steps past it stay where they are)."""
    t = torch.arange(steps)[:, None].expand(steps, len(lengths))
    if not reverse:
        return t
    return torch.where(t < lengths[None], lengths[None] - 1 - t, t)


def _inverse(order: Tensor) -> Tensor:
    return torch.argsort(order, dim=0)


def _step(kind, pre: Tensor, h: Tensor, c: Tensor, r: Tensor, rb, peep, fns, clip, attrs):
    """One time step of one direction: (h, c) after it (c None for GRU/RNN)."""

    def clipped(v: Tensor) -> Tensor:
        return torch.clamp(v, -clip, clip) if clip is not None else v

    hidden = h.shape[-1]
    if kind == "RNN":
        return fns[0](clipped(pre + h @ r.T + (rb if rb is not None else 0))), None
    if kind == "GRU":
        rz = h @ r[: 2 * hidden].T + (rb[: 2 * hidden] if rb is not None else 0)
        z = fns[0](clipped(pre[:, :hidden] + rz[:, :hidden]))
        reset = fns[0](clipped(pre[:, hidden : 2 * hidden] + rz[:, hidden:]))
        r_h, rb_h = r[2 * hidden :], (rb[2 * hidden :] if rb is not None else 0)
        if int(attrs.get("linear_before_reset", 0)):
            candidate = pre[:, 2 * hidden :] + reset * (h @ r_h.T + rb_h)
        else:
            candidate = pre[:, 2 * hidden :] + (reset * h) @ r_h.T + rb_h
        return (1 - z) * fns[1](clipped(candidate)) + z * h, None
    gates = pre + h @ r.T + (rb if rb is not None else 0)
    g_i, g_o, g_f, g_c = gates.split(hidden, dim=1)
    p_i, p_o, p_f = peep.split(hidden) if peep is not None else (0, 0, 0)
    i = fns[0](clipped(g_i + p_i * c))
    f = 1 - i if int(attrs.get("input_forget", 0)) else fns[0](clipped(g_f + p_f * c))
    c_new = f * c + i * fns[1](clipped(g_c))
    o = fns[0](clipped(g_o + p_o * c_new))
    return o * fns[2](c_new), c_new
