"""A BERT-shaped text encoder with a 30,000 x 512 token-embedding table, random weights, built as ONNX by hand.

Language and speech models keep much of their weight in token-embedding tables read by
``Gather``; onnxvq encodes such a table as ``VQGather``, whose body decodes only the rows a run
reads. This sample is the shape to try it on (for sizes and runtime; the values do not matter,
so the weights are N(0, 0.02) draws)::

    input_ids (N, T) int64, T <= 512
      -> Gather from the token table (30000, 512) + the first T rows of the position table (512, 512)
      -> LayerNorm
      -> 4 x pre-norm transformer blocks (8 heads of 64, MLP 512 -> 2048 -> 512; samples/deit_tiny.py)
      -> LayerNorm -> the first token -> Gemm head 512 -> 2            logits (N, 2)

About 28M parameters (15.4M of them in the token table), opset 17. Script use, from the
repository root (writes the model and runs it once in onnxruntime)::

    python samples/text_encoder.py --out samples/out/text_encoder.onnx
    onnxvq compress samples/out/text_encoder.onnx -o samples/out/text_encoder.vq.onnx -k 256 -d 8
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deit_tiny import GraphBuilder, count_params, encoder_block  # noqa: E402

VOCAB, DIM, HEADS, DEPTH, MLP, MAX_POSITIONS, CLASSES = 30000, 512, 8, 4, 2048, 512, 2
OPSET = 17


def build_text_encoder(vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS, depth: int = DEPTH, mlp: int = MLP,
                       classes: int = CLASSES, seed: int = 0) -> onnx.ModelProto:
    """The encoder (module docstring) at any size; the same arguments give the same bytes."""
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    g = GraphBuilder(seed)
    init, rand, node = g.init, g.rand, g.node
    tokens = node("Gather", [rand("embeddings.tokens", vocab, dim), "input_ids"], "embeddings.token_lookup")
    # the first T rows of the position table, T read from the input's shape
    length = node("Shape", ["input_ids"], "embeddings.input_shape", start=1, end=2)
    positions = node("Slice", [rand("embeddings.positions", MAX_POSITIONS, dim), init("zero1", np.array([0], np.int64)),
                               length, init("zero_axis", np.array([0], np.int64))], "embeddings.position_rows")
    x = node("Add", [tokens, positions], "embeddings.sum")
    x = g.layer_norm(x, "embeddings.norm", dim)
    for i in range(depth):
        x = encoder_block(g, x, f"layers.{i}", dim=dim, heads=heads, mlp=mlp)
    x = g.layer_norm(x, "norm", dim)
    x = node("Gather", [x, init("first_token", np.array(0, np.int64))], "first_token_select", axis=1)  # (N, dim)
    node("Gemm", [x, rand("head.weight", classes, dim), init("head.bias", np.zeros(classes, np.float32))],
         "head", transB=1, out="logits")
    graph = helper.make_graph(
        g.nodes, "text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    model.doc_string = (f"BERT-shaped text encoder with random weights (onnxvq samples/text_encoder.py): vocab {vocab}, "
                        f"dim {dim}, {heads} heads, depth {depth}, MLP {mlp}")
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="samples/out/text_encoder.onnx")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build_text_encoder(seed=args.seed)
    import onnxruntime as ort

    from onnxvq.model_io import write_atomically

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 64)).astype(np.int64)
    (logits,) = session.run(None, {"input_ids": ids})
    assert logits.shape == (2, CLASSES), logits.shape
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_atomically(args.out, lambda tmp: onnx.save(model, tmp))
    print(f"wrote {args.out}: {count_params(model):,} parameters, logits {logits.shape}")


if __name__ == "__main__":
    main()
