"""Train an LSTM-heavy CRNN that reads strings of handwritten digits (torch, CPU), export it to ONNX.

The shape of ddddocr's captcha readers and of most CTC text recognizers: a convolutional stem,
a 2-layer bidirectional LSTM of 512 units, a CTC head. Nearly all of its 9.9M parameters sit in
the two LSTMs (9.45M), which is what onnxvq's ``VQLSTM`` encodes::

    image (N, 1, 16, 144), ink in [0, 1]
      -> Conv 1->64 3x3 + BN + ReLU, MaxPool 2      (N, 64, 8, 72)
      -> Conv 64->128 3x3 + BN + ReLU, MaxPool 2    (N, 128, 4, 36)
      -> Conv 128->256 3x3 + BN + ReLU, MaxPool 4x2 (N, 256, 1, 18)
      -> 18 steps of 256 features (a digit is about 2 steps wide)
      -> LSTM 256->512 x 2 directions -> LSTM 1024->512 x 2 directions
      -> Linear 1024->11 (blank + 10 digits)         logits (18, N, 11)

Data ships inside scikit-learn: ``load_digits`` (1,797 8x8 handwritten digits). A string is 4-8
digits drawn from one half of the glyphs (the other half makes the test strings: handwriting
the model never saw), each upscaled to 16x16, with random gaps of 0-3 pixels and vertical jitter
of one pixel, left-aligned on a 16 x 144 canvas. Labels are exact.

Decoding is CTC greedy (argmax per step, repeats merged, blanks dropped); the metric is the
fraction of strings read exactly. 500 steps of Adam on batches of 32 take 15-30 minutes on 2
cores and read about 93% of the 1,000 test strings exactly (92.8% with the default seed).

The ONNX model is written by torch's TorchScript exporter (``dynamo=False``, opset 17): it
writes ``nn.LSTM`` as ONNX ``LSTM`` ops, as the exporters of the real readers did; the
torch.export-based exporter unrolls it. Input ``image`` (N, 1, 16, 144), output ``logits``
(18, N, 11), a dynamic batch axis.

Run from the repository root::

    python samples/crnn_digits.py --out samples/out/crnn_digits.onnx [--steps 500] [--seed 0]
    onnxvq compress samples/out/crnn_digits.onnx -o samples/out/crnn_digits.vq.onnx --target-ratio 8
    python samples/crnn_digits.py --evaluate samples/out/crnn_digits.onnx samples/out/crnn_digits.vq.onnx

Needs torch (``pip install torch==2.13.0``) and scikit-learn; downloads nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

import numpy as np

HEIGHT, WIDTH, GLYPH = 16, 144, 16
LENGTHS = (4, 8)
CLASSES = 11  # CTC blank (0) + digits 0-9 (class d + 1)
HIDDEN = 512
STEPS_OUT = WIDTH // 8
OPSET = 17


def glyphs(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)): scikit-learn's digits split in halves,
    each image 16x16 in [0, 1] (8x8 upscaled by 2)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((2, 2))).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    half = len(images) // 2
    return ((images[order[:half]], digits.target[order[:half]]),
            (images[order[half:]], digits.target[order[half:]]))


def make_strings(source: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` images (n, 1, 16, 144) of digit strings made from ``source`` glyphs, and their texts."""
    images, labels = source
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, HEIGHT, WIDTH), np.float32)
    texts = []
    for i in range(n):
        picks = rng.integers(0, len(images), int(rng.integers(LENGTHS[0], LENGTHS[1] + 1)))
        x = int(rng.integers(0, 4))
        for p in picks:
            shift = int(rng.integers(-1, 2))
            glyph = np.roll(images[p], shift, axis=0)
            out[i, 0, :, x : x + GLYPH] = np.maximum(out[i, 0, :, x : x + GLYPH], glyph)
            x += GLYPH - 2 + int(rng.integers(0, 4))
        texts.append("".join(str(int(labels[p])) for p in picks))
    return out, texts


def ctc_decode(logits: np.ndarray) -> list[str]:
    """Greedy CTC decoding of (T, N, classes) logits."""
    best = logits.argmax(-1).T  # (N, T)
    texts = []
    for row in best:
        kept = [int(c) for j, c in enumerate(row) if c != 0 and (j == 0 or c != row[j - 1])]
        texts.append("".join(str(c - 1) for c in kept))
    return texts


def exact_rate(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def build_torch_model():
    """The CRNN as a torch module (module docstring)."""
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def block(c_in, c_out, pool):
                return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(pool)]

            self.stem = nn.Sequential(*block(1, 64, 2), *block(64, 128, 2), *block(128, 256, (4, 2)))
            self.lstm = nn.LSTM(256, HIDDEN, num_layers=2, bidirectional=True)
            self.head = nn.Linear(2 * HIDDEN, CLASSES)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            features = self.stem(image).squeeze(2).permute(2, 0, 1)  # (T, N, 256)
            return self.head(self.lstm(features)[0])  # (T, N, classes)

    return CRNN()


def train(model, train_glyphs, *, steps: int, batch: int, seed: int, log_every: int = 50) -> None:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    warmup = max(1, steps // 10)  # linear warm-up, then a cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    model.train()
    for step in range(steps):
        images, texts = make_strings(train_glyphs, batch, seed * 1_000_003 + step)
        targets = torch.tensor([int(c) + 1 for t in texts for c in t])
        lengths = torch.tensor([len(t) for t in texts])
        log_probs = model(torch.from_numpy(images)).log_softmax(-1)
        loss = ctc(log_probs, targets, torch.full((batch,), STEPS_OUT), lengths)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1}/{steps}: CTC loss {loss.item():.3f}", flush=True)


def export(model) -> bytes:
    """ONNX bytes with LSTM ops (module docstring: the TorchScript exporter)."""
    import torch

    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice, and LSTM batch-size notes
        torch.onnx.export(
            model, (torch.zeros(2, 1, HEIGHT, WIDTH),), buffer, input_names=["image"], output_names=["logits"],
            opset_version=OPSET, dynamo=False, dynamic_axes={"image": {0: "batch"}, "logits": {1: "batch"}},
        )
    return buffer.getvalue()


def onnx_exact_rate(model, images: np.ndarray, texts: list[str], batch: int = 100) -> float:
    """Exact-string rate of an ONNX model (path or bytes) in onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"image": images[i : i + batch]})[0]
                             for i in range(0, len(images), batch)], axis=1)
    return exact_rate(ctc_decode(logits), texts)


def test_strings(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The evaluation set: ``n`` strings of the held-out glyphs (fixed seeds)."""
    return make_strings(glyphs(seed)[1], n, seed=10**6 + 1)


def calibration_strings(n: int = 64, seed: int = 0) -> np.ndarray:
    """Unlabelled calibration images from the training glyphs, on seeds training never used."""
    return make_strings(glyphs(seed)[0], n, seed=10**7 + 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="samples/out/crnn_digits.onnx", help="ONNX file to write")
    parser.add_argument("--steps", type=int, default=500, help="training steps (batches of --batch strings)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--calib-out", help="also write calibration images here (.npz, input 'image')")
    parser.add_argument("--evaluate", nargs="+", metavar="MODEL", help="only evaluate these ONNX models")
    args = parser.parse_args(argv)
    images, texts = test_strings(seed=args.seed)
    if args.evaluate:
        for path in args.evaluate:
            print(f"{path}: {os.path.getsize(path):,} bytes, exact strings "
                  f"{onnx_exact_rate(path, images, texts):.4f} ({len(texts)} test strings)")
        return 0
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from onnxvq.model_io import write_atomically

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    model = build_torch_model()
    n_params = sum(p.numel() for p in model.parameters())
    n_lstm = sum(p.numel() for p in model.lstm.parameters())
    print(f"training the CRNN ({n_params:,} parameters, {n_lstm:,} in the LSTMs), {args.steps} steps of {args.batch}")
    start = time.perf_counter()
    train(model, glyphs(args.seed)[0], steps=args.steps, batch=args.batch, seed=args.seed)
    print(f"training took {time.perf_counter() - start:.0f} s")
    model.eval()
    with torch.no_grad():
        torch_rate = exact_rate(ctc_decode(model(torch.from_numpy(images)).numpy()), texts)
    data = export(model)
    onnx_rate = onnx_exact_rate(data, images, texts)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically(args.out, write)
    if args.calib_out:
        calibration = calibration_strings(seed=args.seed)

        def write_calibration(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, image=calibration)

        write_atomically(args.calib_out, write_calibration)
    print(f"exact strings ({len(texts)} test strings of unseen handwriting): torch {torch_rate:.4f}, "
          f"onnxruntime {onnx_rate:.4f}")
    print(f"wrote {args.out} ({len(data):,} bytes, opset {OPSET}, input 'image', output 'logits')")
    if abs(torch_rate - onnx_rate) > 2e-3:
        print("error: the exported model disagrees with torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
