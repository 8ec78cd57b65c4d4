"""PP-OCR text orientation classifier shipped in rapidocr (``ch_ppocr_mobile_v2.0_cls_mobile.onnx``).

Data: single text-line crops (random words and numbers in DejaVu fonts, on the same varied
backgrounds as the detector's, a few pixels of margin as a detector's box leaves), rotated by
180 degrees for half of the samples (label 1) and upright otherwise (label 0).

Preprocessing is rapidocr's ``TextClassifier.resize_norm_img`` for ``cls_image_shape`` 3x48x192:
resize to height 48 keeping the aspect ratio (width capped at 192), ``(x/255 - 0.5) / 0.5``,
right-padded with zeros to width 192; BGR channel order.

Metric (headline ``accuracy``): top-1 accuracy of the argmax over the two classes
(rapidocr's labels ``["0", "180"]``) against the true rotation.
"""

from __future__ import annotations

import math

import numpy as np

from common import Evaluation, background, fonts, ink_color, package_file

NAME = "ppocr_cls"
TITLE = "PP-OCR mobile v2.0 cls (rapidocr 3.10.0), 0/180 text orientation"
METRIC = "accuracy"
SHAPE = (3, 48, 192)
BATCH = 8
SIZES = {"eval": 200, "calib": 64, "eval_quick": 100, "calib_quick": 32}

WORDS = (
    "invoice total date amount order number street city station coffee open daily price "
    "free parking exit entrance hotel bank office north south east west road avenue market "
    "phone email report page chapter section table figure sample model data value result "
    "Monday Friday June March London Paris Berlin Tokyo Main Park Hill River Lake "
    "quality yearly budget playground elephant jumping keyboard happy photography"
).split()


def model_path():
    return package_file("rapidocr", "models", "ch_ppocr_mobile_v2.0_cls_mobile.onnx")


def render_line(rng: np.random.Generator, words=WORDS) -> np.ndarray:
    """A BGR crop of one text line with a small random margin."""
    from PIL import Image, ImageDraw, ImageFont

    font_files = fonts()
    size = int(rng.integers(20, 41))
    font = ImageFont.truetype(font_files[rng.integers(len(font_files))], size)
    text = " ".join(words[i] for i in rng.integers(len(words), size=int(rng.integers(1, 5))))
    if rng.random() < 0.3:
        text += " " + str(int(rng.integers(0, 10000)))
    l, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    mx, my = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    w, h = r - l + 2 * mx, b - t + 2 * my
    pil = Image.fromarray(background(rng, h, w))
    ImageDraw.Draw(pil).text((mx - l, my - t), text, font=font, fill=ink_color(rng, np.asarray(pil)))
    return np.ascontiguousarray(np.asarray(pil)[:, :, ::-1])


def preprocess(img: np.ndarray) -> np.ndarray:
    """rapidocr ``TextClassifier.resize_norm_img``: (3, 48, 192) float32."""
    import cv2

    c, ih, iw = SHAPE
    h, w = img.shape[:2]
    rw = iw if math.ceil(ih * w / h) > iw else int(math.ceil(ih * w / h))
    x = cv2.resize(img, (rw, ih), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = (x.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    out = np.zeros(SHAPE, np.float32)
    out[:, :, :rw] = x
    return out


def _sample(rng):
    label = int(rng.integers(2))
    img = render_line(rng)
    if label:
        img = np.ascontiguousarray(img[::-1, ::-1])  # cv2.ROTATE_180
    return preprocess(img), label


def make_eval_set(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = [_sample(rng) for _ in range(n)]
    # batches of BATCH crops, as rapidocr runs them (cls_batch_num 6; 8 here)
    return [
        {"feed": {"x": np.stack([x for x, _ in samples[i:i + BATCH]])},
         "labels": np.array([y for _, y in samples[i:i + BATCH]])}
        for i in range(0, n, BATCH)
    ]


def make_calib_set(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": _sample(rng)[0][None]} for _ in range(n)]


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    outputs = [sess.run(None, s["feed"])[0] for s in eval_set]
    pred = np.concatenate([o.argmax(1) for o in outputs])
    labels = np.concatenate([s["labels"] for s in eval_set])
    metrics = {"accuracy": float(np.mean(pred == labels))}
    if reference is not None:
        metrics["agree_fp32"] = float(np.mean(pred == np.concatenate(reference.extra)))
    return Evaluation(metrics, outputs, [o.argmax(1) for o in outputs])
