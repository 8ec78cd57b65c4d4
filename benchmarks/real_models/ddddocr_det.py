"""ddddocr's click-captcha glyph detector (``common_det.onnx``, a YOLOX-style single-class detector).

Data: captcha-like images (260-420 x 140-260 px) with 3-6 glyphs (common Chinese characters, as
in the click captchas the model is trained for, WenQuanYi Micro Hei 30-52 px, rotated by up to
30 degrees, random colours) at random
non-overlapping positions, on noisy backgrounds with random lines and dots. The ground-truth
box of a glyph is the bounding box of its rendered (rotated) ink.

Pre/post-processing is ddddocr's ``DetectionEngine.get_bbox``: the BGR image is resized by
``r = min(416/h, 416/w)`` into a 416x416 canvas of 114s (no normalisation), the output grid is
decoded with strides 8/16/32, score = objectness x class, class-agnostic NMS at IoU 0.45 and
score > 0.1, boxes scaled back by 1/r.

Metrics: greedy one-to-one matching of detections (by score) to ground-truth boxes at IoU >= 0.5:
``recall``, ``precision`` and their harmonic mean ``f1`` (headline), pooled over the eval set.
"""

from __future__ import annotations

import os

import numpy as np

from common import Evaluation, background, package_file

NAME = "ddddocr_det"
TITLE = "ddddocr common_det (ddddocr 1.6.1), captcha glyph detection"
METRIC = "f1"
SIZE = 416
# common Chinese characters: the glyphs of the click captchas ddddocr's detector is trained on
GLYPHS = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面"
    "公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部"
    "正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关"
    "并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安"
)
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
SIZES = {"eval": 100, "calib": 48, "eval_quick": 50, "calib_quick": 24}


def model_path():
    return package_file("ddddocr", "common_det.onnx")


def _render(rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFont

    h, w = int(rng.integers(140, 261)), int(rng.integers(260, 421))
    img = background(rng, h, w)
    noisy = img.astype(np.float32) + rng.normal(0, rng.uniform(0, 20), img.shape)
    pil = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 6))):  # interference lines, as captchas have
        pts = [tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    if not os.path.exists(CJK_FONT):
        raise FileNotFoundError(f"{CJK_FONT} not found: apt-get install fonts-wqy-microhei")
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 7))):
        for _attempt in range(30):
            size = int(rng.integers(30, 53))
            font = ImageFont.truetype(CJK_FONT, size, index=int(rng.integers(2)))
            ch = GLYPHS[rng.integers(len(GLYPHS))]
            glyph = Image.new("L", (2 * size, 2 * size))
            ImageDraw.Draw(glyph).text((size, size), ch, font=font, fill=255, anchor="mm")
            glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
            ys, xs = np.nonzero(np.asarray(glyph) > 64)
            gx0, gy0, gx1, gy1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            glyph = glyph.crop((gx0, gy0, gx1, gy1))
            gw, gh = glyph.size
            if gw >= w - 4 or gh >= h - 4:
                continue
            x, y = int(rng.integers(2, w - gw - 2)), int(rng.integers(2, h - gh - 2))
            box = (x, y, x + gw, y + gh)
            if any(box[0] < o[2] + 4 and o[0] < box[2] + 4 and box[1] < o[3] + 4 and o[1] < box[3] + 4 for o in boxes):
                continue
            region = np.asarray(pil)[y:y + gh, x:x + gw]
            lum = float(region.mean())
            lo, hi = (0, 90) if lum > 128 else (170, 256)
            color = tuple(int(v) for v in rng.integers(lo, hi, 3))
            pil.paste(Image.new("RGB", glyph.size, color), (x, y), glyph)
            boxes.append(box)
            break
    return np.ascontiguousarray(np.asarray(pil)[:, :, ::-1]), np.array(boxes, np.float32).reshape(-1, 4)


def preprocess(img: np.ndarray) -> tuple[np.ndarray, float]:
    """ddddocr ``DetectionEngine.preproc``: (1, 3, 416, 416) float32 in 0..255, and the scale r."""
    import cv2

    padded = np.full((SIZE, SIZE, 3), 114, np.uint8)
    r = min(SIZE / img.shape[0], SIZE / img.shape[1])
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)[None], r


def _grid():
    grids, strides = [], []
    for s in (8, 16, 32):
        n = SIZE // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(grids), np.concatenate(strides)


def _nms(boxes, scores, thr=0.45):
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        order = order[np.where(inter / (areas[i] + areas[order[1:]] - inter) <= thr)[0] + 1]
    return keep


def postprocess(output: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr's ``demo_postprocess`` + class-agnostic NMS: (boxes x1y1x2y2, scores)."""
    grid, stride = _grid()
    pred = output[0].astype(np.float64).copy()
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * stride
    scores = (pred[:, 4:5] * pred[:, 5:]).max(1)
    xyxy = np.concatenate([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], 1) / r
    ok = scores > 0.1
    xyxy, scores = xyxy[ok], scores[ok]
    keep = _nms(xyxy, scores) if len(scores) else []
    return xyxy[keep], scores[keep]


def _box_iou(a, b):
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match(pred: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> int:
    """True positives of a greedy one-to-one matching (predictions in score order) at IoU >= thr."""
    if not len(pred) or not len(gt):
        return 0
    iou = _box_iou(pred, gt)
    used = np.zeros(len(gt), bool)
    tp = 0
    for row in iou:
        row = np.where(used, -1.0, row)
        j = int(row.argmax())
        if row[j] >= thr:
            used[j] = True
            tp += 1
    return tp


def make_eval_set(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, boxes = _render(rng)
        x, r = preprocess(img)
        out.append({"feed": {"images": x}, "r": r, "boxes": boxes})
    return out


def make_calib_set(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"images": preprocess(_render(rng)[0])[0]} for _ in range(n)]


def _prf(dets, gts):
    tp = sum(match(d, g) for d, g in zip(dets, gts))
    n_pred, n_gt = sum(len(d) for d in dets), sum(len(g) for g in gts)
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_gt if n_gt else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    outputs = [sess.run(None, s["feed"])[0] for s in eval_set]
    dets = [postprocess(o, s["r"])[0] for o, s in zip(outputs, eval_set)]
    p, r, f1 = _prf(dets, [s["boxes"] for s in eval_set])
    metrics = {"f1": f1, "recall": r, "precision": p}
    if reference is not None:
        metrics["f1_vs_fp32"] = _prf(dets, reference.extra)[2]
    return Evaluation(metrics, outputs, dets)
