"""PP-OCR text recognizer shipped in rapidocr (``PP-OCRv6_rec_small.onnx``, CTC over 18,708 chars).

Data: single text-line crops of random strings of digits and latin letters (characters from the
model's own dictionary, stored in its ``character`` metadata), in DejaVu fonts (12-40 px, half of them
blurred), on the varied backgrounds of the detector's set. Glyphs that are the same shape in these fonts (``0/O/o``,
``1/l/I``, ``5/S``...) are left out of the alphabet: no model can tell them apart out of context,
so they would only add a floor to the error that says nothing about the compression.

Preprocessing is rapidocr's ``TextRecognizer.resize_norm_img`` for ``rec_img_shape`` 3x48x320,
one crop per run: resize to height 48 keeping the aspect ratio, width ``48 * max(320/48, w/h)``,
``(x/255 - 0.5) / 0.5``, zero right padding; BGR.

Decoding is rapidocr's ``CTCLabelDecode``: greedy argmax per time step, repeats merged, blanks
(index 0) dropped; characters are the metadata list with a space appended.

Metric: character error rate ``cer`` = summed edit distance / summed true length over the eval
set; the headline is ``1 - cer`` (``char_acc``, higher is better). ``exact`` is the fraction of
lines read exactly.
"""

from __future__ import annotations

import math

import numpy as np

from common import Evaluation, background, edit_distance, fonts, ink_color, package_file

NAME = "ppocr_rec"
TITLE = "PP-OCRv6 rec small (rapidocr 3.10.0), text recognition"
METRIC = "char_acc"
SHAPE = (3, 48, 320)
ALPHABET = "23456789abcdefghijkmnpqrtuvwxyzABCDEFGHJKLMNPQRTUVWXYZ"
SIZES = {"eval": 200, "calib": 48, "eval_quick": 100, "calib_quick": 24}


def model_path():
    return package_file("rapidocr", "models", "PP-OCRv6_rec_small.onnx")


_CHARS: list[str] | None = None


def characters() -> list[str]:
    """The CTC classes: blank, the dictionary in the model's metadata, then a space."""
    global _CHARS
    if _CHARS is None:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(model_path()), load_external_data=False).metadata_props}
        chars = meta["character"].splitlines()
        missing = set(ALPHABET) - set(chars)
        assert not missing, f"characters missing from the dictionary: {missing}"
        _CHARS = ["blank", *chars, " "]
    return _CHARS


def _render(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    from PIL import Image, ImageDraw, ImageFont

    font_files = fonts()
    size = int(rng.integers(12, 41))
    font = ImageFont.truetype(font_files[rng.integers(len(font_files))], size)
    text = "".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=int(rng.integers(4, 13))))
    l, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    mx, my = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    w, h = r - l + 2 * mx, b - t + 2 * my
    pil = Image.fromarray(background(rng, h, w))
    ImageDraw.Draw(pil).text((mx - l, my - t), text, font=font, fill=ink_color(rng, np.asarray(pil)))
    if rng.random() < 0.5:  # camera blur, so that the task is not trivially clean
        from PIL import ImageFilter

        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    return np.ascontiguousarray(np.asarray(pil)[:, :, ::-1]), text


def preprocess(img: np.ndarray) -> np.ndarray:
    """rapidocr ``TextRecognizer.resize_norm_img`` for one crop: (1, 3, 48, W) float32."""
    import cv2

    c, ih, iw = SHAPE
    h, w = img.shape[:2]
    width = int(ih * max(iw / ih, w / h))
    rw = width if math.ceil(ih * w / h) > width else int(math.ceil(ih * w / h))
    x = cv2.resize(img, (rw, ih)).astype(np.float32)
    x = (x.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    out = np.zeros((c, ih, width), np.float32)
    out[:, :, :rw] = x
    return out[None]


def decode(probs: np.ndarray) -> str:
    """rapidocr ``CTCLabelDecode`` (greedy) of one (T, classes) array."""
    chars = characters()
    idx = probs.argmax(-1)
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(chars[i] for i in idx[keep])


def make_eval_set(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, text = _render(rng)
        out.append({"feed": {"x": preprocess(img)}, "text": text})
    return out


def make_calib_set(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": preprocess(_render(rng)[0])} for _ in range(n)]


def _cer(pred, truth):
    return sum(edit_distance(p, t) for p, t in zip(pred, truth)) / sum(len(t) for t in truth)


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    outputs = [sess.run(None, s["feed"])[0] for s in eval_set]
    pred = [decode(o[0]) for o in outputs]
    truth = [s["text"] for s in eval_set]
    cer = _cer(pred, truth)
    metrics = {"char_acc": 1.0 - cer, "cer": cer, "exact": float(np.mean([p == t for p, t in zip(pred, truth)]))}
    if reference is not None:
        metrics["cer_vs_fp32"] = _cer(pred, reference.extra)
    return Evaluation(metrics, outputs, pred)
