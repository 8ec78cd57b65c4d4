"""ddddocr's captcha text recognizer (``common.onnx``, the "beta" model: CNN + BiLSTM + CTC over
8,210 classes). Its older, int8-shipped sibling ``common_old.onnx`` runs the same task in
:mod:`ddddocr_ocr_old`.

Data: captcha-like images of 4-6 characters (digits and latin letters without the glyphs that
are the same shape in these fonts), each glyph in a DejaVu font, rotated by up to 20 degrees
and jittered vertically, in random colours, on noisy backgrounds with interference lines and
dots.

Preprocessing is ddddocr's ``OCREngine._preprocess_image`` for its default models: resize to
height 64 (``Image.LANCZOS``), width scaled alike, grayscale, /255, shape (1, 1, 64, W).
Decoding is its ``_process_text_output``: argmax per step, repeats merged, index 0 (blank)
dropped, characters from ``ddddocr.charsets.CHARSET_BETA``.

Metrics, case-insensitive (ddddocr's training labels mix cases for the same glyph):
``exact`` (headline), the fraction of captchas read exactly; ``char_acc`` = 1 - CER, CER being
the summed edit distance over the summed true length.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from common import Evaluation, background, edit_distance, fonts, package_file

NAME = "ddddocr_ocr"
TITLE = "ddddocr common (ddddocr 1.6.1, beta OCR), captcha text"
METRIC = "exact"
ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABDEFGHJKLMNQRTY"
SIZES = {"eval": 150, "calib": 48, "eval_quick": 60, "calib_quick": 24}


def model_path():
    return package_file("ddddocr", "common.onnx")


_CHARSETS: dict[str, list[str]] = {}


def charset(name: str = "CHARSET_BETA") -> list[str]:
    """``ddddocr.charsets.<name>``, loaded from its file (importing ddddocr needs cv2 and more)."""
    if name not in _CHARSETS:
        spec = importlib.util.spec_from_file_location("_ddddocr_charsets", package_file("ddddocr", "charsets.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CHARSETS[name] = list(getattr(module, name))
    return _CHARSETS[name]


def _render(rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFont

    text = "".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=int(rng.integers(4, 7))))
    size = int(rng.integers(28, 41))
    h = int(size * rng.uniform(1.5, 1.9))
    step = int(size * rng.uniform(0.75, 0.95))
    w = step * len(text) + int(rng.integers(16, 40))
    img = background(rng, h, w).astype(np.float32)
    pil = Image.fromarray(np.clip(img + rng.normal(0, rng.uniform(0, 15), img.shape), 0, 255).astype(np.uint8))
    lum = float(np.asarray(pil).mean())
    lo, hi = (0, 100) if lum > 128 else (160, 256)
    font_files = [f for f in fonts() if "Condensed" not in f]
    x = int(rng.integers(4, 14))
    for ch in text:
        font = ImageFont.truetype(font_files[rng.integers(len(font_files))], size)
        glyph = Image.new("L", (2 * size, 2 * size))
        ImageDraw.Draw(glyph).text((size, size), ch, font=font, fill=255, anchor="mm")
        glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
        color = tuple(int(v) for v in rng.integers(lo, hi, 3))
        y = (h - 2 * size) // 2 + int(rng.integers(-size // 8, size // 8 + 1))
        pil.paste(Image.new("RGB", glyph.size, color), (x - size // 2, y), glyph)
        x += step
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(1, 4))):  # interference lines across the text
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(lo, hi, 3)), width=1)
    for _ in range(int(rng.integers(20, 120))):  # dots
        px, py = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.point((px, py), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return pil, text


def preprocess(pil) -> np.ndarray:
    """ddddocr ``OCREngine._preprocess_image`` (default model): (1, 1, 64, W) float32 in 0..1."""
    from PIL import Image

    width = int(pil.size[0] * (64 / pil.size[1]))
    gray = pil.resize((width, 64), Image.LANCZOS).convert("L")
    return (np.asarray(gray, np.float32) / 255.0)[None, None]


def decode(logits: np.ndarray, charset_name: str = "CHARSET_BETA") -> str:
    """ddddocr ``_process_text_output`` of a (T, 1, classes) output."""
    chars = charset(charset_name)
    idx = logits[:, 0, :].argmax(-1)
    out, prev = [], None
    for i in idx:
        if i != prev and i != 0:
            out.append(chars[i])
        prev = i
    return "".join(out)


def make_eval_set(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pil, text = _render(rng)
        out.append({"feed": {"input1": preprocess(pil)}, "text": text})
    return out


def make_calib_set(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input1": preprocess(_render(rng)[0])} for _ in range(n)]


def _scores(pred, truth):
    pred = [p.lower() for p in pred]
    truth = [t.lower() for t in truth]
    cer = sum(edit_distance(p, t) for p, t in zip(pred, truth)) / sum(len(t) for t in truth)
    return float(np.mean([p == t for p, t in zip(pred, truth)])), cer


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None,
             charset_name: str = "CHARSET_BETA") -> Evaluation:
    outputs = [sess.run(None, s["feed"])[0] for s in eval_set]
    pred = [decode(o, charset_name) for o in outputs]
    exact, cer = _scores(pred, [s["text"] for s in eval_set])
    metrics = {"exact": exact, "char_acc": 1.0 - cer, "cer": cer}
    if reference is not None:
        metrics["exact_vs_fp32"] = _scores(pred, reference.extra)[0]
    return Evaluation(metrics, outputs, pred)
