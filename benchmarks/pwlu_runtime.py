"""What a PWLU activation costs at run time, against the ReLU it stands for.

One ``ai.onnxvq::PWLU`` node on a float32 tensor shaped like an early detector feature map
(``--shape``, default 1 x 64 x 160 x 160 = 1.6M values), channel-wise parameters (one function
per channel, ``--intervals`` N, default 16), run three ways in onnxruntime (CPU provider): the
native kernel (the library of ``onnxvq native build``; "not built" without it), the standard-op
function body (what stock onnxruntime runs), and a plain ``Relu`` on the same tensor as the
baseline. Prints the median and minimum of ``--runs`` timed runs after one warm-up, for 1 and 2
intra-op threads, and each time against the Relu's.

    python benchmarks/pwlu_runtime.py [--shape 1x64x160x160] [--intervals 16] [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxvq import ops
from onnxvq.pwlu import initial_parameters


def pwlu_model(shape, intervals: int) -> onnx.ModelProto:
    channels = shape[1]
    rng = np.random.default_rng(0)
    params = initial_parameters(lambda x: np.maximum(x, 0), (0.0,), rng.normal(-3, 0.5, channels),
                                rng.normal(3, 0.5, channels), intervals)
    params.knots += rng.normal(0, 0.05, params.knots.shape)  # a trained-looking function
    p = (channels,) + (1,) * (len(shape) - 2)
    tensors = {"bounds": params.bounds, "knots": params.knots, "slopes": params.slopes}
    inits = [numpy_helper.from_array(a.reshape(len(a), *p).astype(np.float32), n) for n, a in tensors.items()]
    node = helper.make_node("PWLU", ["X", *tensors], ["Y"], domain=ops.DOMAIN)
    return _model(node, shape, inits, functions=[ops.pwlu.function(17)])


def relu_model(shape) -> onnx.ModelProto:
    return _model(helper.make_node("Relu", ["X"], ["Y"]), shape, [])


def _model(node, shape, inits, functions=()):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                              functions=list(functions))
    model.ir_version = 10
    return model


def timed(model: onnx.ModelProto, x: np.ndarray, threads: int, native: bool, runs: int) -> tuple[float, float]:
    options = ops.session_options(native=native, intra_op_num_threads=threads, inter_op_num_threads=1)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"X": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"X": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x64x160x160")
    parser.add_argument("--intervals", type=int, default=16)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 2
    pwlu, relu = pwlu_model(shape, args.intervals), relu_model(shape)
    built = ops.native_library_path() is not None
    print(f"PWLU on {args.shape} float32, {shape[1]} channel functions of {args.intervals} intervals; "
          f"median (min) of {args.runs} runs, ms")
    print(f"{'variant':<28}{'1 thread':>28}{'2 threads':>28}")
    rows = [("Relu (baseline)", relu, False), ("PWLU, function body", pwlu, False)]
    rows += [("PWLU, native kernel", pwlu, True)] if built else []
    base = {}
    for name, model, native in rows:
        cells = []
        for threads in (1, 2):
            median, best = timed(model, x, threads, native, args.runs)
            base.setdefault(threads, median)
            cells.append(f"{median * 1e3:.3f} ({best * 1e3:.3f}) {median / base[threads]:.1f}x")
        print(f"{name:<28}{cells[0]:>28}{cells[1]:>28}")
    if not built:
        print(f"{'PWLU, native kernel':<28}{'not built (onnxvq native build)':>44}")


if __name__ == "__main__":
    main()
