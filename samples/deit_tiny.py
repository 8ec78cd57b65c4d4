"""A DeiT-tiny-shaped vision transformer with random weights, built as ONNX by hand.

For memory-access estimates (``onnxvq report``), which depend on shapes and storage formats only,
not on weight values, and for time/memory benchmarks. The graph is DeiT-tiny's (Touvron et al.
2021; ~5.7M parameters); :func:`build_deit` builds the same graph at other widths, e.g.
DeiT-small (dim 384, 6 heads, MLP 1536; ~22M parameters)::

    image (N, 3, 224, 224)
      -> Conv 3->192, 16x16 stride 16 (patch embedding) -> (N, 196, 192)
      -> prepend cls token, add position embedding        -> (N, 197, 192)
      -> 12 x [ x + proj(attention(LayerNorm(x)))          3 heads of 64, qkv 192->576
                x + fc2(GELU(fc1(LayerNorm(x)))) ]         MLP 192->768->192
      -> LayerNorm -> cls token -> Gemm head 192->1000     -> logits (N, 1000)

Opset 17 (LayerNormalization, no Gelu op: GELU is ``0.5 x (1 + erf(x / sqrt 2))``). Linear layers
are ``MatMul`` + ``Add`` as exporters write them; the head is a ``Gemm(transB=1)``.

(dimensions shown for tiny). Script use, from the repository root (writes the model and runs it
once in onnxruntime)::

    python samples/deit_tiny.py --out samples/out/deit_tiny.onnx
    python samples/deit_tiny.py --size small --out samples/out/deit_small.onnx
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIM, HEADS, DEPTH, MLP, PATCH, IMAGE, CLASSES = 192, 3, 12, 768, 16, 224, 1000  # DeiT-tiny
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 196 patches + cls
OPSET = 17
# build_deit's keyword arguments per size (Touvron et al. 2021, table 1).
SIZES = {
    "tiny": dict(dim=DIM, heads=HEADS, depth=DEPTH, mlp=MLP),
    "small": dict(dim=384, heads=6, depth=12, mlp=1536),
}


class GraphBuilder:
    """Nodes and initializers of a hand-built graph; weights ~ N(0, 0.02) from one seeded
    generator, drawn in call order (the same calls give the same bytes)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def rand(self, name, *shape):
        return self.init(name, (self.rng.standard_normal(shape) * 0.02).astype(np.float32))

    def node(self, op, inputs, name, **attrs):
        out = name if "out" not in attrs else attrs.pop("out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def linear(self, x, prefix, n_in, n_out):
        """``x @ W + b`` as exporters write it (MatMul, then Add)."""
        y = self.node("MatMul", [x, self.rand(f"{prefix}.weight", n_in, n_out)], f"{prefix}")
        return self.node("Add", [y, self.init(f"{prefix}.bias", np.zeros(n_out, np.float32))], f"{prefix}.add_bias")

    def layer_norm(self, x, prefix, dim):
        return self.node("LayerNormalization", [x, self.init(f"{prefix}.weight", np.ones(dim, np.float32)),
                                                self.init(f"{prefix}.bias", np.zeros(dim, np.float32))],
                         prefix, axis=-1, epsilon=1e-6)


def encoder_block(g: GraphBuilder, x: str, p: str, *, dim: int, heads: int, mlp: int) -> str:
    """One pre-norm transformer block on ``x`` (N, T, dim)::

        x + proj(attention(LayerNorm(x)))      ``heads`` heads, qkv dim -> 3 dim
        x + fc2(GELU(fc1(LayerNorm(x))))       MLP dim -> mlp -> dim, GELU = 0.5 h (1 + erf(h / sqrt 2))
    """
    init, node = g.init, g.node
    head_dim = dim // heads
    h = g.layer_norm(x, f"{p}.norm1", dim)
    qkv = g.linear(h, f"{p}.attn.qkv", dim, 3 * dim)
    qkv = node("Reshape", [qkv, init(f"{p}.shape.qkv", np.array([0, -1, 3, heads, head_dim], np.int64))],
               f"{p}.attn.qkv_reshape")
    qkv = node("Transpose", [qkv], f"{p}.attn.qkv_transpose", perm=[2, 0, 3, 1, 4])  # (3,N,H,T,hd)
    q, k, v = (node("Gather", [qkv, init(f"{p}.index.{j}", np.array(j, np.int64))], f"{p}.attn.{n}", axis=0)
               for j, n in enumerate("qkv"))
    kt = node("Transpose", [k], f"{p}.attn.k_transpose", perm=[0, 1, 3, 2])
    scores = node("MatMul", [q, kt], f"{p}.attn.scores")
    scores = node("Mul", [scores, init(f"{p}.attn.scale", np.array(head_dim**-0.5, np.float32))],
                  f"{p}.attn.scale_mul")
    attn = node("Softmax", [scores], f"{p}.attn.softmax", axis=-1)
    ctx = node("MatMul", [attn, v], f"{p}.attn.context")
    ctx = node("Transpose", [ctx], f"{p}.attn.context_transpose", perm=[0, 2, 1, 3])
    ctx = node("Reshape", [ctx, init(f"{p}.shape.merge", np.array([0, -1, dim], np.int64))],
               f"{p}.attn.context_merge")
    x = node("Add", [x, g.linear(ctx, f"{p}.attn.proj", dim, dim)], f"{p}.residual1")
    h = g.layer_norm(x, f"{p}.norm2", dim)
    h = g.linear(h, f"{p}.mlp.fc1", dim, mlp)
    e = node("Div", [h, init(f"{p}.mlp.sqrt2", np.array(np.sqrt(2.0), np.float32))], f"{p}.mlp.gelu_div")
    e = node("Erf", [e], f"{p}.mlp.gelu_erf")
    e = node("Add", [e, init(f"{p}.mlp.one", np.array(1.0, np.float32))], f"{p}.mlp.gelu_add")
    e = node("Mul", [h, e], f"{p}.mlp.gelu_mul")
    h = node("Mul", [e, init(f"{p}.mlp.half", np.array(0.5, np.float32))], f"{p}.mlp.gelu_half")
    return node("Add", [x, g.linear(h, f"{p}.mlp.fc2", mlp, dim)], f"{p}.residual2")


def build_deit_tiny(seed: int = 0) -> onnx.ModelProto:
    """DeiT-tiny; weights ~ N(0, 0.02) like DeiT's init (values do not matter here)."""
    return build_deit(**SIZES["tiny"], seed=seed)


def build_deit(dim: int = DIM, heads: int = HEADS, depth: int = DEPTH, mlp: int = MLP, seed: int = 0,
               name: str = "deit_tiny") -> onnx.ModelProto:
    """The DeiT graph at any width/depth: ``dim`` channels, ``heads`` attention heads (``dim``
    divisible by ``heads``), ``depth`` blocks, MLP hidden size ``mlp``; 16x16 patches of a 224x224
    image, 1000 classes. Weights ~ N(0, 0.02) like DeiT's init; the same arguments give the same
    bytes. ``name`` is the graph name."""
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    g = GraphBuilder(seed)
    init, rand, node = g.init, g.rand, g.node

    # patch embedding: (N,3,224,224) -> (N,192,14,14) -> (N,192,196) -> (N,196,192)
    x = node("Conv", ["image", rand("patch_embed.weight", dim, 3, PATCH, PATCH),
                      init("patch_embed.bias", np.zeros(dim, np.float32))],
             "patch_embed", kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    x = node("Reshape", [x, init("shape.patches", np.array([0, dim, -1], np.int64))], "patch_flatten")
    x = node("Transpose", [x], "patch_transpose", perm=[0, 2, 1])
    # cls token broadcast to the batch: Expand to (N, 1, 192)
    shape = node("Shape", ["image"], "image_shape")
    batch = node("Gather", [shape, init("zero1", np.array([0], np.int64))], "batch", axis=0)
    cls_shape = node("Concat", [batch, init("shape.cls_tail", np.array([1, dim], np.int64))], "cls_shape", axis=0)
    cls = node("Expand", [rand("cls_token", 1, 1, dim), cls_shape], "cls_expand")
    x = node("Concat", [cls, x], "tokens", axis=1)
    x = node("Add", [x, rand("pos_embed", 1, TOKENS, dim)], "pos_add")

    for i in range(depth):
        x = encoder_block(g, x, f"blocks.{i}", dim=dim, heads=heads, mlp=mlp)

    x = g.layer_norm(x, "norm", dim)
    x = node("Gather", [x, init("cls_index", np.array(0, np.int64))], "cls_select", axis=1)  # (N, 192)
    node("Gemm", [x, rand("head.weight", CLASSES, dim), init("head.bias", np.zeros(CLASSES, np.float32))],
         "head", transB=1, out="logits")
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    size = next((s for s, a in SIZES.items() if a == dict(dim=dim, heads=heads, depth=depth, mlp=mlp)), None)
    kind = size or f"({dim} dim, {heads} heads, depth {depth}, MLP {mlp})"
    model.doc_string = f"DeiT-{kind}-shaped ViT with random weights (onnxvq samples/deit_tiny.py)"
    onnx.checker.check_model(model, full_check=True)
    return model


def count_params(model: onnx.ModelProto) -> int:
    """Floating-point parameters (int64 shape/index constants excluded)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: samples/out/deit_SIZE.onnx")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (~5.7M) or small (~22M parameters)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out = args.out or f"samples/out/deit_{args.size}.onnx"
    model = build_deit(**SIZES[args.size], seed=args.seed, name=f"deit_{args.size}")
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).standard_normal((1, 3, IMAGE, IMAGE)).astype(np.float32)
    (logits,) = session.run(None, {"image": image})
    assert logits.shape == (1, CLASSES), logits.shape
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    onnx.save(model, args.out)
    print(f"wrote {args.out}: {count_params(model):,} parameters, logits {logits.shape}")


if __name__ == "__main__":
    main()
