"""Calibration data: loading, checking against the model's inputs, batching.

A *sample* is one feed dict (graph input name -> array shaped as the model takes it, batch axis
included). Three sources give samples:

* one ``.npz`` file whose arrays are keyed by graph input name, samples stacked on the first
  axis. An array with one more dimension than the input gives one feed per entry (``arr[i]``);
  an array of the input's own rank is cut along its first (batch) axis (``arr[i:i+1]``);
* a folder of ``.npz`` files, one sample each, any shapes (variable image widths, recurrent state
  inputs), read in sorted file-name order;
* (Python API) any iterable of feed dicts.

Labels are optional integer class labels, one per batch row, for a task loss on the first output:
a ``labels`` array in the ``.npz`` file(s), a ``labels`` key in a feed dict, or a separate file
(``--labels``: ``.npy``, or ``.npz`` with a ``labels`` array).

Samples whose inputs all have a symbolic first dimension can be concatenated along it into
batches; other models run one sample at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxvq.errors import OnnxVQError

logger = logging.getLogger(__name__)

__all__ = ["CalibrationSet", "LABELS_KEY", "load_calibration"]

LABELS_KEY = "labels"
# Larger calibration files are refused before reading (a device such as /dev/zero has no end).
MAX_CALIBRATION_FILE = 64 * 2**30
CalibrationSource = str | os.PathLike | Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass
class CalibrationSet:
    """Checked calibration samples of one model.

    Attributes:
        samples: feed dicts, each with the model's batch axis.
        labels: per sample, the (batch,) int64 class labels, or None when there are none.
        batchable: whether samples of equal shapes may be concatenated along the first axis.
    """

    samples: list[dict[str, np.ndarray]]
    labels: list[np.ndarray] | None
    batchable: bool

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def rows(self) -> int:
        """Batch rows over all samples (what a top-1 agreement is counted over)."""
        return sum(_batch_rows(s) for s in self.samples)

    def split(self, holdout: float) -> tuple[CalibrationSet, CalibrationSet | None]:
        """(train, held back): the last ``round(holdout * n)`` samples are held back, none when
        fewer than 10 samples (then the quality summary is measured on the training samples)."""
        n_held = int(round(holdout * len(self))) if len(self) >= 10 else 0
        if n_held == 0:
            return self, None
        cut = len(self) - n_held
        part = lambda a, b: CalibrationSet(  # noqa: E731
            self.samples[a:b], self.labels[a:b] if self.labels else None, self.batchable
        )
        return part(0, cut), part(cut, len(self))

    def subset(self, n: int) -> CalibrationSet:
        """The first ``n`` samples (all when fewer)."""
        return CalibrationSet(self.samples[:n], self.labels[:n] if self.labels else None, self.batchable)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, *, max_bytes: int | None = None):
        """Yield ``(sample indices, feed, labels or None)``: samples concatenated up to
        ``batch_size`` rows, and with ``max_bytes`` up to that many input bytes (a batch of large
        images multiplies every activation, and onnxruntime's arena keeps the largest).

        Only samples with identical input shapes are joined. With ``rng`` the order of samples
        (and so of batches) is shuffled.
        """
        order = np.arange(len(self)) if rng is None else rng.permutation(len(self))
        if not self.batchable:
            for i in order:
                yield self._join([int(i)])
            return
        pending: dict[tuple, list[int]] = {}
        for i in order:
            key = tuple((name, a.shape[1:]) for name, a in sorted(self.samples[i].items()))
            group = pending.setdefault(key, [])
            group.append(int(i))
            full = sum(_batch_rows(self.samples[j]) for j in group) >= batch_size
            if full or (max_bytes is not None and sum(_feed_bytes(self.samples[j]) for j in group) >= max_bytes):
                yield self._join(group)
                pending[key] = []
        for group in pending.values():
            if group:
                yield self._join(group)

    def _join(self, indices: list[int]):
        feed = join_feeds([self.samples[i] for i in indices])
        labels = None
        if self.labels:
            labels = self.labels[indices[0]] if len(indices) == 1 else np.concatenate([self.labels[i] for i in indices])
        return indices, feed, labels


def join_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feeds of equal input shapes (but the batch axis) as one batch: concatenated along the
    first axis; a single feed as it is."""
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


def load_calibration(
    source: CalibrationSource | CalibrationSet,
    model: ir.Model,
    *,
    labels: str | os.PathLike | np.ndarray | None = None,
) -> CalibrationSet:
    """Read and check calibration samples for ``model``.

    Raises :class:`OnnxVQError` naming the problem for a missing or unknown input, a wrong
    dtype, rank or fixed dimension, non-finite values, mismatched labels, or no samples at all.

    Example::

        >>> np.savez("calib.npz", image=images)  # doctest: +SKIP
        >>> calib = load_calibration("calib.npz", model)  # doctest: +SKIP
    """
    if isinstance(source, CalibrationSet):
        return source
    inputs = _graph_inputs(model)
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the calibration data"
    samples, sample_labels = _read(source, inputs)
    if not samples:
        raise OnnxVQError(f"no calibration samples in {where}; give at least one")
    fixed_batch = _fixed_batch(inputs, samples)
    for i, sample in enumerate(samples):
        _check_sample(sample, inputs, f"{where}, sample {i}", batch=1 if fixed_batch else None)

    if labels is not None:
        if any(l is not None for l in sample_labels):
            raise OnnxVQError(f"{where} already holds labels; drop --labels or the 'labels' arrays")
        sample_labels = _split_labels(_read_labels(labels), samples)
    if any(l is not None for l in sample_labels):
        if any(l is None for l in sample_labels):
            raise OnnxVQError(f"only some samples of {where} have labels; give labels for all or none")
        for i, (sample, lab) in enumerate(zip(samples, sample_labels)):
            _check_labels(lab, sample, f"{where}, sample {i}")
        checked_labels = [np.asarray(l, np.int64).reshape(-1) for l in sample_labels]
    else:
        checked_labels = None
    if fixed_batch:
        samples, checked_labels = _stack_to_batch(samples, checked_labels, fixed_batch, where)
    batchable = all(v.shape is not None and len(v.shape) > 0 and _is_symbolic(v.shape[0]) for v in inputs.values())
    return CalibrationSet(samples, checked_labels, batchable)


def _fixed_batch(inputs: Mapping[str, ir.Value], samples: list[dict]) -> int | None:
    """The model's fixed batch size when it is over 1 and every sample is a batch of one (such
    samples are then stacked to the model's size), else None."""
    firsts = {v.shape[0] if v.shape is not None and len(v.shape) else None for v in inputs.values()}
    if len(firsts) != 1:
        return None
    batch = firsts.pop()
    if batch is None or _is_symbolic(batch) or batch <= 1:
        return None
    if all(name in sample and np.ndim(sample[name]) and np.shape(sample[name])[0] == 1
           for sample in samples for name in inputs):
        return int(batch)
    return None


def _stack_to_batch(samples: list[dict], labels: list[np.ndarray] | None, batch: int, where: str):
    """Consecutive batch-of-one samples stacked into the model's fixed batch; a remainder that
    does not fill a batch is left out (and said so)."""
    if len(samples) < batch:
        raise OnnxVQError(
            f"the model takes batches of exactly {batch} and {where} has {len(samples)} sample(s) of "
            f"batch 1; give at least {batch} (they are stacked {batch} at a time)"
        )
    used = len(samples) - len(samples) % batch
    if used < len(samples):
        logger.warning("calibration: the model takes batches of %d; the last %d sample(s) of %s are left out",
                       batch, len(samples) - used, where)
    stacked = [
        {name: np.concatenate([s[name] for s in samples[i : i + batch]]) for name in samples[0]}
        for i in range(0, used, batch)
    ]
    if labels is not None:
        labels = [np.concatenate(labels[i : i + batch]) for i in range(0, used, batch)]
    return stacked, labels


def _graph_inputs(model: ir.Model) -> dict[str, ir.Value]:
    initializers = set(model.graph.initializers)
    return {v.name: v for v in model.graph.inputs if v.name not in initializers}


def _read(source, inputs: Mapping[str, ir.Value]) -> tuple[list[dict], list]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise OnnxVQError(f"calibration folder {path} has no .npz files")
            pairs = [_pop_labels(_read_npz(f)) for f in files]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        if not path.exists():
            raise OnnxVQError(f"calibration data {path} does not exist")
        arrays, stacked_labels = _pop_labels(_read_npz(path))
        return _unstack(arrays, stacked_labels, inputs, path)
    if isinstance(source, Mapping):
        raise OnnxVQError("calibration data given as one dict: pass a list of feed dicts (one per sample)")
    try:
        feeds = list(source)
    except TypeError:
        raise OnnxVQError(
            f"calibration data must be a .npz path, a folder of .npz files or an iterable of feed "
            f"dicts, got {type(source).__name__}"
        ) from None
    pairs = []
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise OnnxVQError(f"calibration sample {i} is a {type(feed).__name__}, not a dict of arrays")
        pairs.append(_pop_labels({str(k): np.asarray(v) for k, v in feed.items()}))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, each header checked against its stored size before its data
    is read: a damaged or hostile header cannot make this allocate more than the file holds."""
    from onnxvq.model_io import check_readable_file

    hint = "expected an .npz written by numpy.savez"
    check_readable_file(os.fspath(path), "calibration file", MAX_CALIBRATION_FILE, hint=hint)
    if not zipfile.is_zipfile(path):
        raise OnnxVQError(f"calibration file {path} is not an .npz archive (a .npy or another format?); {hint}")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member)
                    needed = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or needed > info.file_size:
                        raise ValueError(
                            f"array {name!r} claims shape {shape} of {dtype} ({needed} bytes) but "
                            f"stores {info.file_size} bytes"
                        )
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except Exception as e:  # zipfile, zlib, numpy header and read errors: all mean a bad file
        raise OnnxVQError(f"cannot read calibration file {path} ({_first_line(e)}); {hint}") from None
    return arrays


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy version {version}")
    shape, _, dtype = read[version](member)
    return shape, dtype


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _pop_labels(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    labels = arrays.pop(LABELS_KEY, None)
    return arrays, labels


def _unstack(arrays, stacked_labels, inputs, path) -> tuple[list[dict], list]:
    """One .npz with samples stacked on the first axis -> per-sample feeds (and labels)."""
    counts = {}
    views = {}
    for name, array in arrays.items():
        value = inputs.get(name)
        rank = len(value.shape) if value is not None and value.shape is not None else array.ndim
        if array.ndim == rank + 1:
            views[name] = lambda a, i: a[i]
        else:  # the model's own first axis is the sample axis
            views[name] = lambda a, i: a[i : i + 1]
        if array.ndim == 0:
            raise OnnxVQError(f"calibration array {name!r} in {path} is a scalar; stack samples on the first axis")
        counts[name] = array.shape[0]
    if len(set(counts.values())) > 1:
        raise OnnxVQError(
            f"calibration arrays in {path} hold different numbers of samples "
            f"({', '.join(f'{n}: {c}' for n, c in counts.items())}); stack the same samples in each"
        )
    n = next(iter(counts.values()), 0)
    samples = [{name: views[name](a, i) for name, a in arrays.items()} for i in range(n)]
    if stacked_labels is None:
        return samples, [None] * n
    return samples, _split_labels(stacked_labels, samples)


def _read_labels(labels) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels
    from onnxvq.model_io import check_readable_file

    path = Path(labels)
    if path.suffix == ".npz":
        data = _read_npz(path)
        if LABELS_KEY not in data:
            raise OnnxVQError(f"labels file {path} has no 'labels' array (it has {', '.join(data)})")
        return data[LABELS_KEY]
    hint = "expected a .npy (numpy.save) or an .npz with a 'labels' array"
    check_readable_file(os.fspath(path), "labels file", MAX_CALIBRATION_FILE, hint=hint)
    try:
        with open(path, "rb") as f:
            shape, dtype = _npy_header(f)
            needed = math.prod(shape) * dtype.itemsize
            if dtype.hasobject or needed > os.path.getsize(path):
                raise ValueError(f"it claims shape {shape} of {dtype} but holds fewer bytes")
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:  # numpy's header and read errors: all mean a bad file
        raise OnnxVQError(f"cannot read labels file {path} ({_first_line(e)}); {hint}") from None


def _split_labels(labels: np.ndarray, samples: list[dict]) -> list[np.ndarray]:
    """One array of labels for all samples -> per sample, as many as its batch rows."""
    labels = np.asarray(labels).reshape(-1)
    sizes = [_batch_rows(s) for s in samples]
    if len(labels) != sum(sizes):
        raise OnnxVQError(
            f"{len(labels)} labels for {sum(sizes)} calibration rows; give one integer label per row"
        )
    return np.split(labels, np.cumsum(sizes)[:-1])


def _check_labels(labels: np.ndarray, sample: dict, where: str) -> None:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise OnnxVQError(f"labels of {where} are {labels.dtype}; labels must be integer class indices")
    if labels.size != _batch_rows(sample):
        raise OnnxVQError(f"{where} has {_batch_rows(sample)} rows but {labels.size} labels")
    if labels.size and labels.min() < 0:
        raise OnnxVQError(f"labels of {where} contain negative values; labels must be class indices >= 0")


def _check_sample(sample: dict, inputs: Mapping[str, ir.Value], where: str, *, batch: int | None = None) -> None:
    """Raise OnnxVQError for a sample the model cannot take; ``batch`` overrides the model's
    first dimension (samples to be stacked to a fixed batch)."""
    missing = [name for name in inputs if name not in sample]
    if missing:
        raise OnnxVQError(
            f"{where} has no array for model input(s) {', '.join(map(repr, missing))} "
            f"(model inputs: {', '.join(inputs)})"
        )
    unknown = [name for name in sample if name not in inputs]
    if unknown:
        raise OnnxVQError(
            f"{where} has array(s) {', '.join(map(repr, unknown))} that are not model inputs "
            f"(model inputs: {', '.join(inputs)}; labels go in an array named 'labels')"
        )
    for name, value in inputs.items():
        array = sample[name]
        expected = value.dtype.numpy() if value.dtype is not None else None
        if expected is not None and array.dtype != expected:
            raise OnnxVQError(
                f"{where}: input {name!r} is {array.dtype} but the model expects {np.dtype(expected)}; "
                f"convert it (e.g. array.astype(np.{np.dtype(expected)}))"
            )
        shape = value.shape
        if shape is None:
            continue
        if array.ndim != len(shape):
            raise OnnxVQError(
                f"{where}: input {name!r} has shape {array.shape} but the model expects rank "
                f"{len(shape)} ({_format_shape(shape)})"
            )
        for axis, (got, want) in enumerate(zip(array.shape, shape)):
            if axis == 0 and batch is not None:
                want = batch
            if not _is_symbolic(want) and got != want:
                raise OnnxVQError(
                    f"{where}: input {name!r} has shape {array.shape} but the model expects "
                    f"{_format_shape(shape)} (axis {axis} must be {want})"
                )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise OnnxVQError(f"{where}: input {name!r} contains NaN or Inf")


def _batch_rows(sample: dict) -> int:
    first = next(iter(sample.values()))
    return int(first.shape[0]) if first.ndim else 1


def _is_symbolic(dim) -> bool:
    """Not a fixed size: a name, unknown, or the -1 / 0 some exporters write (paddle2onnx)."""
    return not isinstance(dim, int) or dim <= 0


def _format_shape(shape) -> str:
    shown = [str(d) if not _is_symbolic(d) else "?" if isinstance(d, int) else str(d or "?") for d in shape]
    return "(" + ", ".join(shown) + ")"


def _feed_bytes(feed: dict[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in feed.values())
