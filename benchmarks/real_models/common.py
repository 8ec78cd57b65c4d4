"""Shared helpers of the real-model suite: package file lookup, sessions, rendering, metrics.

Nothing here knows about a particular model. Every random choice takes a ``numpy.random.Generator``
so that a seed fixes a data set exactly.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Evaluation",
    "background",
    "edit_distance",
    "fonts",
    "ink_color",
    "package_file",
    "session",
    "sqnr_db",
]

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
# where models built by the suite itself (the samples) are kept; run.py points it into --out
CACHE_DIR = Path(__file__).resolve().parent / "out" / "cache"


@dataclasses.dataclass
class Evaluation:
    """What one model variant did on an eval set.

    Attributes:
        metrics: task metrics (the family's ``METRIC`` key is the headline, higher is better).
        outputs: per sample, the raw model output array the SQNR against fp32 is computed on.
        extra: per-sample derived data that metrics against the fp32 run need (e.g. masks).
    """

    metrics: dict[str, float]
    outputs: list[np.ndarray]
    extra: list[Any] = dataclasses.field(default_factory=list)


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (importing rapidocr or ddddocr pulls in dependencies the suite does not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: pip install -r benchmarks/real_models/requirements.txt"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in {package} (another version? see requirements.txt)")
    return path


def session(model: Any, threads: int = 2):
    """An onnxruntime CPU session of a path, bytes or ModelProto, with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    """Output SQNR in dB over all samples: 10 log10(sum ref^2 / sum (ref - test)^2)."""
    signal = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in reference)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - t.astype(np.float64)))) for r, t in zip(reference, test))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def fonts(mono: bool | None = None) -> list[str]:
    """DejaVu font files (Sans, Serif, Mono and their bold/oblique/condensed cuts).

    ExtraLight and the math font are left out: hairline strokes and symbol glyphs are not what
    these models were trained to read.
    """
    paths = sorted(glob.glob(os.path.join(FONT_DIR, "DejaVu*.ttf")))
    paths = [p for p in paths if "ExtraLight" not in p and "MathTeX" not in p]
    if mono is not None:
        paths = [p for p in paths if ("Mono" in p) == mono]
    if not paths:
        raise FileNotFoundError(f"no DejaVu fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    return paths


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) uint8 background: flat, gradient, noisy, textured or cluttered.

    Kinds are drawn so that a data set sees each; all keep a luminance that dark or light ink
    (see :func:`ink_color`) stands out from, as text on real documents and signs does.
    """
    kind = rng.integers(5)
    base = rng.integers(0, 256, size=3).astype(np.float32)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == 1:  # linear gradient between two colours
        other = rng.integers(0, 256, size=3).astype(np.float32)
        t = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height, dtype=np.float32)
        t = t[None, :, None] if t.size == width else t[:, None, None]
        img = base * (1 - t) + other * t + np.zeros((height, width, 1), np.float32)
    elif kind == 2:  # pixel noise
        img = img + rng.normal(0.0, rng.uniform(5, 25), size=(height, width, 3))
    elif kind == 3:  # smooth texture: upsampled coarse noise (paper, walls)
        coarse = rng.normal(0.0, rng.uniform(10, 35), size=(height // 16 + 2, width // 16 + 2, 3))
        ys = np.linspace(0, coarse.shape[0] - 1.001, height)
        xs = np.linspace(0, coarse.shape[1] - 1.001, width)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        c = coarse
        tex = (c[y0][:, x0] * (1 - fy) * (1 - fx) + c[y0 + 1][:, x0] * fy * (1 - fx)
               + c[y0][:, x0 + 1] * (1 - fy) * fx + c[y0 + 1][:, x0 + 1] * fy * fx)
        img = img + tex
    elif kind == 4:  # faint clutter: a few translucent rectangles and lines
        from PIL import Image, ImageDraw

        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil, "RGBA")
        for _ in range(int(rng.integers(3, 9))):
            x0, x1 = sorted(rng.integers(0, width, size=2))
            y0, y1 = sorted(rng.integers(0, height, size=2))
            color = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (int(rng.integers(30, 80)),)
            if rng.random() < 0.5:
                draw.rectangle([x0, y0, x1, y1], fill=color)
            else:
                draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(1, 3)))
        img = np.asarray(pil).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def ink_color(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int, int]:
    """A text colour with strong luminance contrast to ``region`` (dark on light, light on dark)."""
    lum = float(np.mean(region))
    if lum > 110:
        return tuple(int(v) for v in rng.integers(0, 60, size=3))
    return tuple(int(v) for v in rng.integers(200, 256, size=3))
