"""pq vs lr2vq vs ssvq at equal size, without data, data-aware, and fine-tuned, in one run.

Models, data and evaluation are those of ``samples/finetune_compare.py`` (the MNIST CNN on the
10,000 MNIST test images with 1,024 unlabeled MNIST training images for calibration; the digits
MLP on its 450 test images with its 1,347 training images for calibration). Each variant is
compressed, saved and evaluated in onnxruntime (function bodies, no plugin); the tables give the
file size, the ratio against the fp32 file, top-1 and its change, and the compress time.

Sections (``--only`` picks some):

* ``lr2vq``: ``lr2vq`` (``--rank auto``) against ``pq`` at the same k and subvector size m, for
  m = 8 and m = 16 (k = 256 on MNIST: 1 and 0.5 bits per weight plus codebooks; k = 16 on the
  small digits MLP, where 256 codewords would outweigh the codes), four ways each: ``none``
  (no data), ``data-aware`` (calibration data, no training), ``layer`` and ``e2e`` fine-tuning.
  The chosen rank of every layer is listed under the table.
* ``ssvq``: ``ssvq`` against ``pq`` and ``lr2vq`` at equal bits per weight: 2 bits (pq and
  lr2vq k=256 d=4, k=16 d=2 on the digits MLP; ssvq k=16 d=4: 1 code bit + 1 sign bit) and
  about 1.5 bits (pq and lr2vq k=256 d=5: 1.6 bits, k=64 d=4 on the digits MLP; ssvq k=16 d=8:
  0.5 + 1 bits, the paper's DeiT setting), without data and with ``layer`` and ``e2e``
  fine-tuning.
* ``ablation``: ssvq k=16 d=8 fine-tuned end to end with the signs fixed, learned without
  freezing, and learned with progressive freezing; with the number of signs that ended flipped,
  the flip events during training, and the signs frozen (summed over layers).

Fine-tuning uses onnxvq's defaults (10 epochs, Adam lr 1e-3, batch 32, KL distillation for
``e2e``, 10% of the calibration samples held back, seed 0), with torch's deterministic algorithms.
About 10 minutes on 2 cores for everything.

Run from the repository root after building the MNIST sample (``bash samples/quickstart.sh``)::

    python samples/method_compare.py [--only lr2vq,ssvq,ablation] [--models mnist,digits]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_compare import Sample, load_digits_sample, load_mnist_sample, size, stem, top1  # noqa: E402

import onnxvq  # noqa: E402

VARIANTS = ("none", "data-aware", "layer", "e2e")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One compressed variant: method, k, d, further method options, calibration use."""

    method: str
    k: int
    d: int
    variant: str
    options: tuple = ()

    @property
    def name(self) -> str:
        extra = "".join(f" {key}={value}" for key, value in self.options)
        return f"{self.method} k={self.k} d={self.d}{extra} {self.variant}"


@dataclasses.dataclass
class Result:
    setting: Setting
    seconds: float
    nbytes: int
    top1: float
    ranks: list[int]
    signs: dict  # summed sign statistics of ssvq layers


def sections(sample: Sample) -> dict[str, list[Setting]]:
    # The digits MLP's layers are small (16k and 65k weights): 256-entry codebooks of 16 floats
    # would outweigh their codes, so its lr2vq section uses k=16.
    k = 16 if stem(sample).startswith("digits") else 256
    lr2vq = [Setting(method, k, m, variant) for m in (8, 16) for method in ("pq", "lr2vq") for variant in VARIANTS]
    # Equal bits per weight: 2 (pq and lr2vq 8-bit codes per 4 weights, or 4-bit codes per 2 on
    # the digits MLP; ssvq k=16 d=4) and about 1.5 (pq and lr2vq k=256 d=5: 1.6, or k=64 d=4: 1.5
    # on the digits MLP; ssvq k=16 d=8).
    plain = ((16, 2), (64, 4)) if k == 16 else ((256, 4), (256, 5))
    ssvq = [
        Setting(method, kk, d, variant)
        for pairs in ((plain[0], (16, 4)), (plain[1], (16, 8)))
        for method, (kk, d) in (("pq", pairs[0]), ("lr2vq", pairs[0]), ("ssvq", pairs[1]))
        for variant in ("none", "layer", "e2e")
    ]
    ablation = [Setting("ssvq", 16, 8, "e2e", (("signs", mode),)) for mode in ("fixed", "learn", "freeze")]
    return {"lr2vq": lr2vq, "ssvq": ssvq, "ablation": ablation}


def run(sample: Sample, setting: Setting, out: str, cache: dict) -> Result:
    key = (sample.path, setting)
    if key in cache:
        return cache[key]
    calib = [{sample.input_name: sample.calib_x[i : i + 1]} for i in range(len(sample.calib_x))]
    calibration = {} if setting.variant == "none" else dict(
        calib=calib, finetune="none" if setting.variant == "data-aware" else setting.variant
    )
    path = os.path.join(out, f"{stem(sample)}.{setting.name.replace(' ', '_').replace('=', '')}.onnx")
    start = time.perf_counter()
    result = onnxvq.compress(sample.path, method=setting.method, k=setting.k, d=setting.d,
                             **dict(setting.options), **calibration)
    result.save(path)
    seconds = time.perf_counter() - start
    layers = result.summary.compressed_layers
    signs: dict = {}
    for layer in layers:
        for name, value in (layer.finetune or {}).items():
            if name.startswith("sign"):
                signs[name] = signs.get(name, 0) + value
    cache[key] = Result(setting, seconds, size(path), top1(path, sample), [l.rank for l in layers if l.rank], signs)
    print(f"  done: {setting.name} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return cache[key]


def table(sample: Sample, title: str, settings: list[Setting], out: str, cache: dict) -> None:
    base_size, base_acc = size(sample.path), top1(sample.path, sample)
    results = [run(sample, s, out, cache) for s in settings]
    with_signs = any(r.signs for r in results)
    print(f"#### {title}: {sample.title.split(',')[0]} (fp32 {base_size / 1e3:,.1f} kB, top-1 {100 * base_acc:.2f}%)")
    print()
    header = "| variant | file size | ratio vs fp32 file | top-1 | Δ top-1 (pp) | compress s |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if with_signs:
        header += " signs flipped | flip events | signs frozen |"
        rule += "---:|---:|---:|"
    print(header)
    print(rule)
    for r in results:
        line = (f"| {r.setting.name} | {r.nbytes / 1e3:,.1f} kB | {base_size / r.nbytes:.1f}x | {100 * r.top1:.2f}% "
                f"| {100 * (r.top1 - base_acc):+.2f} | {r.seconds:.1f} |")
        if with_signs:
            s = r.signs
            line += " " + " | ".join(f"{s[name]:,}" if name in s else "-"
                                     for name in ("signs_flipped", "sign_flip_events", "signs_frozen")) + " |"
        print(line)
    ranks = [(r.setting.name, r.ranks) for r in results if r.setting.method == "lr2vq" and r.ranks]
    if ranks:
        print()
        seen = set()
        for name, layer_ranks in ranks:
            label = name.rsplit(" ", 1)[0]
            if (label, tuple(layer_ranks)) not in seen:
                seen.add((label, tuple(layer_ranks)))
                print(f"- {name}: rank per compressed layer {layer_ranks}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="samples/out/mnist_cnn.onnx", help="the MNIST sample CNN")
    parser.add_argument("--only", default="lr2vq,ssvq,ablation", help="sections to run (comma-separated)")
    parser.add_argument("--models", default="mnist,digits", help="models to run (comma-separated)")
    parser.add_argument("--out", help="folder for the files (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.model):
        print(f"error: {args.model} not found; build it with `python samples/mnist_cnn.py --out {args.model}`",
              file=sys.stderr)
        return 1
    chosen = [s for s in args.only.split(",") if s]
    known = ("lr2vq", "ssvq", "ablation")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {list(known)}", file=sys.stderr)
        return 1
    import torch

    torch.use_deterministic_algorithms(True)
    out = args.out or tempfile.mkdtemp(prefix="onnxvq-method-compare-")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    print(f"onnxruntime {ort.__version__}, onnxvq {onnxvq.__version__}; files in {out}")
    print()
    samples = []
    if "mnist" in args.models:
        samples.append(load_mnist_sample(args.model))
    if "digits" in args.models:
        samples.append(load_digits_sample(out))
    cache: dict = {}
    for sample in samples:
        for section in chosen:
            table(sample, section, sections(sample)[section], out, cache)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
