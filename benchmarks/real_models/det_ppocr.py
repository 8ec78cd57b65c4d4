"""PP-OCR text detector shipped in rapidocr (``PP-OCRv6_det_small.onnx``, a DB detector).

Data: lines of random words rendered with PIL in DejaVu fonts (several sizes, weights, slants) at
known, non-overlapping positions on varied backgrounds (flat, gradient, noise, texture, clutter).

Preprocessing is rapidocr's ``DetPreProcess``: resize so that both sides are multiples of 32
(``limit_type="max"``, ``limit_side_len=640``: rapidocr's options, chosen over its default
``min``/736 only to keep CPU time low), then ``(x/255 - 0.5) / 0.5`` in BGR channel order.

Metrics, all mask IoUs with intersection and union pooled over the eval set:

* ``iou`` (headline): the regions DB post-processing reports (rapidocr's ``DBPostProcess``:
  ``p > 0.3``, 2x2 dilation, one minimum-area box per connected component, dropped when its
  short side is < 3 px or its mean probability < 0.5, then unclipped by ``D = A * 1.6 / L``)
  against the rendered text-line boxes;
* ``iou_map``: the thresholded map ``p > 0.3`` itself against the mask DB is trained to predict,
  each rendered box shrunk by DB's label rule (offset inwards by ``D = A (1 - r^2) / L``,
  r = 0.4, A and L the box's area and perimeter);
* ``iou_fp32``: the thresholded map against the fp32 model's own (1.0 for fp32 itself).
"""

from __future__ import annotations

import numpy as np

from common import Evaluation, background, fonts, ink_color, package_file

NAME = "ppocr_det"
TITLE = "PP-OCRv6 det small (rapidocr 3.10.0), text detection"
METRIC = "iou"
THRESH = 0.3  # rapidocr Det.thresh
BOX_THRESH = 0.5  # rapidocr Det.box_thresh
UNCLIP_RATIO = 1.6  # rapidocr Det.unclip_ratio
SHRINK_RATIO = 0.4  # DB's label shrink (PaddleOCR MakeShrinkMap)
LIMIT_SIDE_LEN = 640
SIZES = {"eval": 64, "calib": 32, "eval_quick": 24, "calib_quick": 16}

WORDS = (
    "the of and to in is for on with as by at from that this be are was it an or not have "
    "invoice total date amount order number street city station coffee open daily price "
    "free parking exit entrance hotel bank office north south east west road avenue market "
    "phone email report page chapter section table figure sample model data value result "
    "Monday Friday June March London Paris Berlin Tokyo Main Park Hill River Lake "
    "OCR PDF USB GPS ID No Tel VAT EUR USD"
).split()


def model_path():
    return package_file("rapidocr", "models", "PP-OCRv6_det_small.onnx")


def _shrink(box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = w * h * (1 - SHRINK_RATIO**2) / (2 * (w + h))
    return x0 + d, y0 + d, x1 - d, y1 - d


def _render(rng: np.random.Generator):
    """One image with 2-7 text lines; returns (BGR uint8 image, list of line boxes)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = int(rng.integers(360, 641)), int(rng.integers(480, 801))
    img = background(rng, h, w)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    font_files = fonts()
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(2, 8))):
        for _attempt in range(20):
            size = int(rng.integers(16, 45))
            font = ImageFont.truetype(font_files[rng.integers(len(font_files))], size)
            text = " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(1, 6))))
            if rng.random() < 0.3:
                text += " " + str(int(rng.integers(0, 100000)))
            l, t, r, b = draw.textbbox((0, 0), text, font=font)
            if r - l >= w - 8 or b - t >= h - 8:
                continue
            x = int(rng.integers(4 - l, w - 4 - r))
            y = int(rng.integers(4 - t, h - 4 - b))
            box = (x + l, y + t, x + r, y + b)
            pad = max(4, size // 3)  # keep lines apart: DB would merge touching lines
            if any(box[0] < o[2] + pad and o[0] < box[2] + pad and box[1] < o[3] + pad and o[1] < box[3] + pad for o in boxes):
                continue
            region = np.asarray(pil)[box[1]:box[3], box[0]:box[2]]
            draw.text((x, y), text, font=font, fill=ink_color(rng, region))
            boxes.append(box)
            break
    rgb = np.asarray(pil)
    return np.ascontiguousarray(rgb[:, :, ::-1]), boxes  # rapidocr works on cv2's BGR images


def preprocess(img: np.ndarray) -> np.ndarray:
    """rapidocr ``DetPreProcess`` (limit_type max): (1, 3, H32, W32) float32."""
    import cv2

    h, w = img.shape[:2]
    ratio = min(1.0, LIMIT_SIDE_LEN / max(h, w))
    rh = int(round(int(h * ratio) / 32) * 32)
    rw = int(round(int(w * ratio) / 32) * 32)
    img = cv2.resize(img, (rw, rh))
    x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def _masks(boxes, shape, net_shape):
    """Ground-truth masks (shrunk, full box) at network resolution."""
    sy, sx = net_shape[0] / shape[0], net_shape[1] / shape[1]
    shrunk = np.zeros(net_shape, bool)
    full = np.zeros(net_shape, bool)
    for box in boxes:
        for mask, b in ((shrunk, _shrink(box)), (full, box)):
            x0, y0 = int(round(b[0] * sx)), int(round(b[1] * sy))
            x1, y1 = int(round(b[2] * sx)), int(round(b[3] * sy))
            mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
    return shrunk, full


def make_eval_set(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, boxes = _render(rng)
        x = preprocess(img)
        shrunk, full = _masks(boxes, img.shape[:2], x.shape[2:])
        out.append({"feed": {"x": x}, "gt": shrunk, "gt_box": full})
    return out


def make_calib_set(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": preprocess(_render(rng)[0])} for _ in range(n)]


def db_regions(prob: np.ndarray) -> np.ndarray:
    """The area DB post-processing reports as text: a boolean mask of its unclipped boxes."""
    import cv2

    bitmap = cv2.dilate((prob > THRESH).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(bitmap * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(prob.shape, np.uint8)
    for contour in contours[:1000]:  # DBPostProcess.max_candidates
        (cx, cy), (w, h), angle = cv2.minAreaRect(contour)
        if min(w, h) < 3:
            continue
        inside = np.zeros(prob.shape, np.uint8)
        cv2.fillPoly(inside, [cv2.boxPoints(((cx, cy), (w, h), angle)).astype(np.int32)], 1)
        if prob[inside > 0].mean() < BOX_THRESH:
            continue
        # pyclipper's offset of a rectangle by d is the rectangle grown by d on each side
        # (with rounded corners, which a box fit then squares off again, as DB does)
        d = w * h * UNCLIP_RATIO / (2 * (w + h))
        box = cv2.boxPoints(((cx, cy), (w + 2 * d, h + 2 * d), angle))
        cv2.fillPoly(out, [np.round(box).astype(np.int32)], 1)
    return out.astype(bool)


def _iou(pairs) -> float:
    pairs = list(pairs)
    inter = sum(int(np.count_nonzero(a & b)) for a, b in pairs)
    union = sum(int(np.count_nonzero(a | b)) for a, b in pairs)
    return inter / union if union else 1.0


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    outputs, masks = [], []
    for s in eval_set:
        prob = sess.run(None, s["feed"])[0]
        outputs.append(prob)
        masks.append(prob[0, 0] > THRESH)
    metrics = {
        "iou": _iou((db_regions(o[0, 0]), s["gt_box"]) for o, s in zip(outputs, eval_set)),
        "iou_map": _iou(zip(masks, (s["gt"] for s in eval_set))),
    }
    metrics["iou_fp32"] = _iou(zip(masks, reference.extra)) if reference is not None else 1.0
    return Evaluation(metrics, outputs, masks)
