"""What weighting an embedding table's rows by calibration lookups buys, on the text encoder.

``samples/text_encoder.py`` (30,000 x 512 token table, random weights) reads token streams drawn
from a Zipf(1.1) distribution over the vocabulary (the frequent tokens scattered over the table,
as a tokenizer's ids are). Only the token table is encoded (``--skip`` everything else), once
from its weights alone and once with calibration streams (``--calib``, no fine-tuning), so the
difference is the row weighting of :mod:`onnxvq.row_frequency` alone. Measured on a held-out
stream from the same distribution (other seeds):

* table SQNR: every row alike (what a uniform stream would see);
* lookup SQNR: the rows the held-out stream reads, as often as it reads them;
* logits SQNR: the model's output against fp32's on the held-out stream.

    python benchmarks/embedding_rows.py [--calib-sequences 256] [--methods pq ssvq lr2vq] [-d 8 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "samples"))

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import onnxvq  # noqa: E402
from text_encoder import VOCAB, build_text_encoder  # noqa: E402

TABLE, LOOKUP = "embeddings.tokens", "embeddings.token_lookup"
SEQUENCE = 128


def zipf_stream(seed: int, sequences: int, exponent: float = 1.1) -> np.ndarray:
    order = np.random.default_rng(123).permutation(VOCAB)  # token rank -> table row
    p = 1.0 / np.arange(1, VOCAB + 1) ** exponent
    draws = np.random.default_rng(seed).choice(VOCAB, (sequences, SEQUENCE), p=p / p.sum())
    return order[draws].astype(np.int64)


def sqnr(reference: np.ndarray, approximation: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(10 * np.log10((reference**2).sum() / ((reference - approximation) ** 2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-sequences", type=int, default=256, help=f"calibration streams of {SEQUENCE} tokens")
    parser.add_argument("--methods", nargs="+", default=["pq", "ssvq", "lr2vq"])
    parser.add_argument("-d", nargs="+", type=int, default=[8, 16])
    parser.add_argument("-k", type=int, default=256)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    model = build_text_encoder()
    table = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == TABLE))
    calib = zipf_stream(1, args.calib_sequences)
    held_out = zipf_stream(2, 256)
    share_seen = np.isin(held_out, calib).mean()
    print(f"token table {table.shape[0]} x {table.shape[1]}; calibration {calib.size} tokens "
          f"({len(np.unique(calib))} distinct rows); held-out {held_out.size} tokens, "
          f"{100 * share_seen:.1f}% of them rows the calibration read")
    feeds = [{"input_ids": calib[i : i + 1]} for i in range(len(calib))]  # one per row, as an .npz gives
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"input_ids": held_out})[0]
    rows = held_out.reshape(-1)
    header = ["method", "d", "encoding", "table SQNR", "lookup SQNR", "logits SQNR", "seconds"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for method in args.methods:
        for d in args.d:
            for label, extra in (("weights only", {}), ("row-weighted", {"calib": feeds, "finetune": "none"})):
                start = time.perf_counter()
                result = onnxvq.compress(model, method=method, k=args.k, d=d, skip=[f"re:^(?!{LOOKUP}$).*"], **extra)
                seconds = time.perf_counter() - start
                compressed = result.to_proto().SerializeToString()
                twin = ir.serde.serialize_model(onnxvq.decompress(result.to_proto()))
                decoded = numpy_helper.to_array(next(i for i in twin.graph.initializer if i.name == TABLE))
                logits = ort.InferenceSession(compressed).run(None, {"input_ids": held_out})[0]
                print(f"| {method} | {d} | {label} | {sqnr(table, decoded):.2f} | {sqnr(table[rows], decoded[rows]):.2f} "
                      f"| {sqnr(reference, logits):.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
