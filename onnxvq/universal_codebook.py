"""One universal codebook for every layer of many models, by kernel density estimation (VQ4ALL).

VQ4ALL (Deng, Li et al., arXiv 2412.06875) encodes every layer of every model as codes into one
fixed codebook ``U`` (k x d) plus per-output-channel scales: ``W_sub = s_r * U[codes]``. This
module builds ``U`` and its file; the ``vq4all`` method consumes it (:func:`load_codebook`).

The pipeline:

1. **sample** (:func:`sample_subvectors`): every compressible weight of every model (found as
   :func:`onnxvq.api.compress` finds them, a shared weight once, layers under
   :data:`MIN_SIZE` weights skipped) is seen as its matrix ``M`` of :mod:`onnxvq.layout` (one row
   per output channel). Each row is divided by its RMS, ``n_r = m_r / rms(m_r)`` (an all-zero row
   by 1), exactly as :mod:`onnxvq.channel_scales` does, because the decode multiplies
   ``U[codes]`` by the row's scale: ``U`` must model *normalised* rows. Rows are cut into
   subvectors of length ``d``; a padded tail subvector (``d`` not dividing the row) is never
   sampled. From each weight, ``per_tensor`` subvectors are drawn uniformly without replacement
   (all of them when there are fewer), so every tensor of every model weighs the same whatever
   its size: a few huge layers do not decide the codebook of all.
2. **estimate and draw** (:func:`kde_codebook`): the pooled sample ``x_1..x_n`` defines the
   Gaussian kernel density ``p(x) = 1/n sum_i N(x; x_i, H)`` with the full bandwidth matrix
   ``H = h^2 Sigma`` (``Sigma`` the sample covariance). ``k`` codewords are drawn from ``p``:
   ``c_j = x_{i_j} + L z_j`` with ``i_j`` uniform, ``z_j ~ N(0, I)`` and ``L L' = H``. Optionally
   (``refine``) Lloyd's k-means on the pooled sample then starts from those draws.
3. **store** (:func:`save_codebook`, :func:`load_codebook`): an ``.npz`` holding ``codebook``
   (float16, k x d) and ``provenance`` (a JSON string). The codebook's identity is the sha256 of
   its float16 bytes (C order, little-endian); a compressed model records it, and loading
   verifies it, so a model is never decoded with a codebook other than its own.

Example::

    >>> from onnxvq.universal_codebook import build_codebook, load_codebook, save_codebook
    >>> cb = build_codebook(["a.onnx", "b.onnx"], k=256, d=4)  # doctest: +SKIP
    >>> save_codebook(cb, "universal.npz")  # doctest: +SKIP
    >>> load_codebook("universal.npz", expected_sha256=cb.sha256).codebook.shape  # doctest: +SKIP
    (256, 4)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxvq import ops
from onnxvq.candidates import find_layers, group_by_weight, iter_nodes
from onnxvq.channel_scales import row_rms
from onnxvq.conv_folding import fold_batch_norms, fold_bias_adds
from onnxvq.errors import OnnxVQError
from onnxvq.integer_ops import convert_integer_ops
from onnxvq.kmeans import assign
from onnxvq.layout import WeightLayout
from onnxvq.model_check import check_model
from onnxvq.model_io import SOURCE_FILES, check_output_paths, check_readable_file, load_model, write_atomically
from onnxvq.weight_folding import fold_weight_chains

__all__ = [
    "BANDWIDTH_RULES",
    "MAX_K",
    "MIN_SIZE",
    "UniversalCodebook",
    "bandwidth_factor",
    "build_codebook",
    "format_codebook",
    "kde_codebook",
    "load_codebook",
    "sample_subvectors",
    "save_codebook",
]

BANDWIDTH_RULES = ("scott", "silverman")
# Codes are stored as uint16 at most.
MAX_K = 65536
# The compressor's default min_size: smaller layers stay dense, so they do not shape the codebook.
MIN_SIZE = 1024
FORMAT_VERSION = 1
# A codebook file holds at most 65536 x d float16 values: anything this large is not one.
_MAX_FILE_BYTES = 2**31
_HINT = "give the .npz written by `onnxvq codebook build`"

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


@dataclasses.dataclass(frozen=True, eq=False)
class UniversalCodebook:
    """A universal codebook and where it came from.

    Attributes:
        codebook: (k, d) float32 holding exactly float16 values (the stored form; values are
            rounded to float16 on construction), read-only.
        provenance: how it was built (:func:`build_codebook` lists the fields); JSON-able.
        sources: resolved paths of every file the models were read from, so that saving never
            overwrites one; not stored in the file.

    ``sha256`` is the content hash, the hex sha256 of the float16 codebook bytes (C order,
    little-endian). It does not cover the shape: a consumer checks ``k`` and ``d`` too.
    """

    codebook: np.ndarray
    provenance: dict
    sources: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self) -> None:
        codebook = np.asarray(self.codebook)
        if codebook.ndim != 2:
            raise ValueError(f"a codebook is (k, d), got shape {codebook.shape}")
        stored = np.ascontiguousarray(codebook, dtype="<f2").astype(np.float32)
        stored.setflags(write=False)
        object.__setattr__(self, "codebook", stored)

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def d(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def sha256(self) -> str:
        return _content_hash(self.codebook.astype("<f2"))


def sample_subvectors(
    models: Sequence[ModelLike], d: int, per_tensor: int, seed: int | np.random.SeedSequence
) -> tuple[np.ndarray, dict[str, dict]]:
    """Draw ``per_tensor`` row-normalised subvectors of length ``d`` from every compressible
    weight of every model (module docstring, step 1).

    Args:
        models: paths, ``onnx.ModelProto`` or ``onnx_ir.Model`` objects (never modified).
        d: subvector length.
        per_tensor: subvectors drawn from each weight, without replacement (all when fewer).
        seed: the draws of weight ``w`` of model ``i`` come from ``SeedSequence(seed,
            spawn_key=(0, i, crc32(w)))``, so one model's draws do not depend on the others'.

    Returns:
        ``(samples, counts)``: samples (n, d) float64, weight after weight, model after model;
        counts keyed by the model's label (its path as given, or ``<model i>`` in memory):
        ``{"tensors": int, "subvectors": int, "weights": {weight name: subvectors}}``. A weight
        whose rows are shorter than ``d`` gives no whole subvector and is not counted.
    """
    samples, counts, _ = _sample(models, d, per_tensor, seed)
    return samples, counts


def bandwidth_factor(n: int, d: int, rule: str = "scott") -> float:
    """The KDE bandwidth factor ``h`` (``H = h^2 Sigma``) for ``n`` samples in ``d`` dimensions.

    * Scott: ``h = n^(-1/(d+4))``;
    * Silverman: ``h = (n (d+2) / 4)^(-1/(d+4))``.

    Both are the normal-reference rules (the AMISE-optimal bandwidth when the data are Gaussian),
    as in ``scipy.stats.gaussian_kde``.
    """
    if rule == "scott":
        return float(n ** (-1.0 / (d + 4)))
    if rule == "silverman":
        return float((n * (d + 2) / 4.0) ** (-1.0 / (d + 4)))
    raise OnnxVQError(f"bandwidth rule must be one of {', '.join(BANDWIDTH_RULES)}, got {rule!r}")


def kde_codebook(
    samples: np.ndarray,
    k: int,
    seed: int | np.random.SeedSequence,
    *,
    bandwidth: str = "scott",
    refine: bool = False,
    refine_iterations: int = 25,
) -> tuple[np.ndarray, float]:
    """``k`` codewords drawn from the Gaussian kernel density estimate of ``samples``.

    The density is ``p(x) = 1/n sum_i N(x; x_i, H)`` with ``H = h^2 Sigma``, ``Sigma`` the sample
    covariance (ddof 1) and ``h`` from :func:`bandwidth_factor`: Scott's ``n^(-1/(d+4))`` or
    Silverman's ``(n (d+2) / 4)^(-1/(d+4))``. A draw is ``x_i + L z`` with ``i`` uniform (with
    replacement), ``z ~ N(0, I_d)`` and ``L`` the Cholesky factor of ``H`` (of ``H + eps I``, the
    smallest relative jitter that works, when ``Sigma`` is singular, e.g. fewer samples than
    dimensions or a constant coordinate). So the codewords have mean ``mean(x)`` and covariance
    ``(n-1)/n Sigma + H ~= (1 + h^2) Sigma``.

    With ``refine``, Lloyd's k-means on ``samples`` then starts from the draws, at most
    ``refine_iterations`` times (until the inertia improves by less than 1e-4, relatively); a
    codeword left with no point takes the point farthest from its codeword. That needs
    ``k <= n``.

    Returns:
        ``(codebook (k, d) float32, h)``.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise OnnxVQError(f"samples must be (n, d) with d >= 1, got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise OnnxVQError(f"a kernel density estimate needs at least 2 samples, got {n}")
    if not np.isfinite(x).all():
        raise OnnxVQError("the samples contain NaN or Inf")
    if k < 1:
        raise OnnxVQError(f"k must be at least 1, got {k}")
    if refine and k > n:
        raise OnnxVQError(
            f"k-means refinement needs k <= the {n} subvectors sampled, got k={k}: "
            "raise --per-tensor, add models, or drop --refine"
        )
    h = bandwidth_factor(n, d, bandwidth)
    sigma = np.atleast_2d(np.cov(x, rowvar=False))
    factor = _cholesky(h * h * sigma)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=k)
    codebook = x[picks] + rng.standard_normal((k, d)) @ factor.T
    if refine:
        codebook = _lloyd(x, codebook, refine_iterations)
    return codebook.astype(np.float32), h


def build_codebook(
    models: Sequence[ModelLike],
    *,
    k: int,
    d: int,
    per_tensor: int = 4096,
    seed: int = 0,
    bandwidth: str = "scott",
    refine: bool = False,
) -> UniversalCodebook:
    """Build one universal codebook from the compressible weights of ``models``.

    Args:
        models: model paths (or ``onnx.ModelProto`` / ``onnx_ir.Model`` objects).
        k: codewords, 2..65536.
        d: subvector length, >= 1.
        per_tensor: subvectors sampled from every compressible weight (:func:`sample_subvectors`).
        seed: seed of the sampling and of the KDE draws.
        bandwidth: ``"scott"`` or ``"silverman"`` (:func:`bandwidth_factor`).
        refine: k-means on the pooled sample from the drawn codewords (:func:`kde_codebook`).

    ``provenance`` holds: ``format_version``; ``models`` (per model: ``file``, its base name or
    None in memory; ``sha256`` of the model file, None in memory; ``tensors``, ``subvectors``);
    ``samples`` (pooled); ``k``, ``d``, ``per_tensor``, ``bandwidth`` (the rule),
    ``bandwidth_factor`` (``h``), ``refine``, ``seed``, ``onnxvq_version``.

    Example::

        >>> cb = build_codebook(["resnet18.onnx", "mobilenet.onnx"], k=4096, d=8)  # doctest: +SKIP
        >>> cb.k, cb.d, cb.sha256[:12]  # doctest: +SKIP
        (4096, 8, '3f2a...')
    """
    _check_settings(models, k, d, per_tensor, seed, bandwidth)
    models = list(models)
    _check_distinct([os.fspath(m) for m in models if isinstance(m, (str, os.PathLike))])
    samples, counts, sources = _sample(models, int(d), int(per_tensor), np.random.SeedSequence(int(seed)), require=True)
    records = []
    for index, model in enumerate(models):
        path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        count = counts[_label(model, index)]
        records.append({
            "file": os.path.basename(path) if path is not None else None,
            "sha256": _file_hash(path) if path is not None else None,
            "tensors": count["tensors"],
            "subvectors": count["subvectors"],
        })
    codebook, h = kde_codebook(samples, int(k), np.random.SeedSequence(int(seed), spawn_key=(1,)),
                               bandwidth=bandwidth, refine=refine)
    if not np.isfinite(codebook.astype(np.float16)).all():
        raise OnnxVQError("the codebook overflows float16 (normalised weights over 65504): the models' weights are damaged")
    from onnxvq import __version__

    provenance = {
        "format_version": FORMAT_VERSION,
        "models": records,
        "samples": int(len(samples)),
        "k": int(k),
        "d": int(d),
        "per_tensor": int(per_tensor),
        "bandwidth": bandwidth,
        "bandwidth_factor": h,
        "refine": bool(refine),
        "seed": int(seed),
        "onnxvq_version": __version__,
    }
    return UniversalCodebook(codebook, provenance, tuple(sources))


def save_codebook(
    codebook: UniversalCodebook, path: str | os.PathLike, *, protected: Iterable[str | os.PathLike] = ()
) -> str:
    """Write ``codebook`` to ``path`` (exactly that name) atomically; return the path.

    The file is an ``.npz`` with ``codebook`` (float16, k x d) and ``provenance`` (a JSON
    string: :attr:`UniversalCodebook.provenance` plus ``sha256``). Refuses to write over any
    file the codebook's models were read from, or over ``protected``.
    """
    path = os.fspath(path)
    check_output_paths({"output": path}, [*codebook.sources, *map(os.fspath, protected)])
    record = json.dumps({**codebook.provenance, "sha256": codebook.sha256}, sort_keys=True)
    stored = codebook.codebook.astype("<f2")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a name
            np.savez(f, codebook=stored, provenance=np.array(record))

    try:
        write_atomically(path, write)
    except OSError as e:
        raise OnnxVQError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def load_codebook(path: str | os.PathLike, expected_sha256: str | None = None) -> UniversalCodebook:
    """Read a codebook file written by :func:`save_codebook` and verify it.

    The content hash must equal the one the file records (else the file was modified), and
    ``expected_sha256`` when given (the hash a compressed model records). Every problem is a
    one-line :class:`OnnxVQError`.
    """
    path = os.fspath(path)
    check_readable_file(path, "codebook", _MAX_FILE_BYTES, hint=_HINT)
    codebook, record = _read_npz(path)
    try:
        provenance = json.loads(record)
    except ValueError:
        provenance = None
    if not isinstance(provenance, dict):
        raise OnnxVQError(f"the codebook {path} has a damaged provenance record (not a JSON object); {_HINT}")
    stored_hash = provenance.pop("sha256", None)
    if not isinstance(stored_hash, str):
        raise OnnxVQError(f"the codebook {path} records no sha256 in its provenance; {_HINT}")
    actual = _content_hash(codebook)
    if actual != stored_hash.lower():
        raise OnnxVQError(
            f"the codebook {path} was modified: its content has hash {actual} but it records "
            f"{stored_hash}; rebuild it or restore the original file"
        )
    if (provenance.get("k"), provenance.get("d")) != codebook.shape:
        raise OnnxVQError(
            f"the codebook {path} was modified: it is {codebook.shape[0]} x {codebook.shape[1]} but "
            f"records k={provenance.get('k')}, d={provenance.get('d')}; rebuild it or restore the original file"
        )
    if not np.isfinite(codebook).all():
        raise OnnxVQError(f"the codebook {path} contains NaN or Inf; rebuild it")
    if expected_sha256 is not None and actual != expected_sha256.strip().lower():
        raise OnnxVQError(
            f"codebook {path} has hash {actual} but the model expects {expected_sha256}: "
            "use the codebook the model was compressed with"
        )
    return UniversalCodebook(codebook.astype(np.float32), provenance)


def format_codebook(codebook: UniversalCodebook, path: str | None = None) -> str:
    """What ``onnxvq codebook show`` prints: the hash, then the provenance."""
    p = codebook.provenance
    where = f"{path}: " if path else ""
    lines = [
        f"{where}k={codebook.k}, d={codebook.d} (float16, {codebook.k * codebook.d * 2} bytes)",
        f"sha256 {codebook.sha256}",
        f"built by onnxvq {p.get('onnxvq_version', '?')} from {len(p.get('models', []))} model(s), "
        f"{p.get('per_tensor', '?')} subvectors per tensor at most, {p.get('samples', '?')} in all, seed {p.get('seed', '?')}",
    ]
    for model in p.get("models", []):
        name = model.get("file") or "(in-memory model)"
        digest = f" (sha256 {model['sha256']})" if model.get("sha256") else ""
        lines.append(f"  {name}{digest}: {model.get('tensors', '?')} tensors, {model.get('subvectors', '?')} subvectors")
    factor = p.get("bandwidth_factor")
    factor_text = f"{factor:.6g}" if isinstance(factor, (int, float)) else "?"
    refined = "yes" if p.get("refine") else "no"
    lines.append(f"kernel density: {p.get('bandwidth', '?')} bandwidth, h={factor_text}; refined by k-means: {refined}")
    return "\n".join(lines)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_settings(models, k: int, d: int, per_tensor: int, seed: int, bandwidth: str) -> None:
    if isinstance(models, (str, os.PathLike)) or not len(models):
        raise OnnxVQError("no models given: a universal codebook is built from one or more models")
    if not _is_int(d) or d < 1:
        raise OnnxVQError(f"subvector length d must be at least 1, got {d}")
    if not _is_int(k) or not 2 <= k <= MAX_K:
        raise OnnxVQError(f"k must be in 2..{MAX_K} (codes are stored in 16 bits at most), got {k}")
    if not _is_int(per_tensor) or per_tensor < 1:
        raise OnnxVQError(f"per_tensor must be at least 1, got {per_tensor}")
    if not _is_int(seed) or seed < 0:
        raise OnnxVQError(f"the seed must be a non-negative integer, got {seed}")
    if bandwidth not in BANDWIDTH_RULES:
        raise OnnxVQError(f"bandwidth rule must be one of {', '.join(BANDWIDTH_RULES)}, got {bandwidth!r}")


def _check_distinct(paths: list[str]) -> None:
    """The same file twice would count its tensors twice."""
    seen: dict[str, str] = {}
    for path in paths:
        resolved = os.path.realpath(path)
        if resolved in seen:
            raise OnnxVQError(f"the model {path} is given twice (also as {seen[resolved]}); give each model once")
        seen[resolved] = path


def _sample(models, d: int, per_tensor: int, seed, *, require: bool = False) -> tuple[np.ndarray, dict[str, dict], list[str]]:
    """:func:`sample_subvectors`, plus the resolved paths of every file the models were read from;
    with ``require``, a model that gives no subvector is an error as soon as it is seen."""
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    pieces: list[np.ndarray] = []
    counts: dict[str, dict] = {}
    sources: list[str] = []
    for index, model in enumerate(models):
        label = _label(model, index)
        model = _as_ir_model(model)
        sources += model.meta.get(SOURCE_FILES, [])
        weights: dict[str, int] = {}
        for name, matrix, layout in _weight_matrices(model, d, label):
            key = (*root.spawn_key, 0, index, zlib.crc32(name.encode()))
            drawn = _draw(matrix, layout, per_tensor, np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=key)))
            if len(drawn):
                pieces.append(drawn)
                weights[name] = len(drawn)
        if require and not weights:
            raise OnnxVQError(
                f"{label} has no compressible weight of at least {MIN_SIZE} weights with rows of at "
                f"least d={d} entries (see `onnxvq inspect`); leave it out"
            )
        counts[label] = {"tensors": len(weights), "subvectors": sum(weights.values()), "weights": weights}
    samples = np.concatenate(pieces) if pieces else np.empty((0, d), np.float64)
    return samples, counts, list(dict.fromkeys(sources))


def _label(model: ModelLike, index: int) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"<model {index}>"


def _as_ir_model(model: ModelLike) -> ir.Model:
    """A model the folding passes may change: loaded from a path, or a copy of the caller's."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, onnx.ModelProto):
        check_model(model, source="the model")
        return ir.serde.deserialize_model(model)
    if isinstance(model, ir.Model):
        return model.clone()  # shares the (never mutated) tensors
    raise OnnxVQError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _weight_matrices(model: ir.Model, d: int, label: str):
    """(weight name, float32 matrix M, layout) of each compressible weight, as compress sees them."""
    if any(n.domain == ops.DOMAIN for n in iter_nodes(model)):
        raise OnnxVQError(f"{label} is already compressed by onnxvq (it has ai.onnxvq nodes); use the original model")
    # The same preparation as compress: weights computed from constants, BatchNormalization and
    # integer weights become plain float weights of layers, as they will be encoded (bias Adds
    # change no weight, but folding them lets a Conv -> Add -> BatchNormalization chain fold).
    fold_weight_chains(model)
    fold_bias_adds(model)
    fold_batch_norms(model)
    convert_integer_ops(model)
    layers, _ = find_layers(model)
    for group in group_by_weight(layers).values():
        layer = group[0]
        if layer.size < MIN_SIZE or not layer.weight_dtype.is_floating_point():
            continue
        transposed, row_axes = layer.view()
        layout = WeightLayout(layer.weight_shape, transposed, row_axes, d)
        matrix = layout.to_matrix(layer.weight_array()).astype(np.float32)
        if not np.isfinite(matrix).all():
            raise OnnxVQError(
                f"weight {layer.weight.name!r} of {label} contains NaN or Inf; fix the model first"
            )
        yield layer.weight.name, matrix, layout


def _draw(matrix: np.ndarray, layout: WeightLayout, per_tensor: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_tensor`` whole subvectors of the row-normalised ``matrix``, float64 (k, d)."""
    d = layout.d
    whole = layout.n_sub if layout.tail == d else layout.n_sub - 1  # a padded tail is not data
    total = layout.rows * whole
    if total == 0:
        return np.empty((0, d), np.float64)
    picks = np.sort(rng.choice(total, size=min(per_tensor, total), replace=False))
    rows, slots = np.divmod(picks, whole)
    # Normalised as channel_scales does (float32 matrix / float32 RMS), only where drawn.
    rms = row_rms(matrix)
    columns = slots[:, None] * d + np.arange(d)
    return (matrix[rows[:, None], columns] / rms[rows][:, None]).astype(np.float64)


def _cholesky(h: np.ndarray) -> np.ndarray:
    """A factor ``L`` with ``L L' = H``, or ``= H + eps I`` with the smallest relative jitter
    ``eps`` that makes ``H`` positive definite (a singular sample covariance)."""
    d = len(h)
    scale = float(np.trace(h)) / d
    if not scale > 0:  # every sample identical: the density is a point mass
        return np.zeros_like(h)
    for jitter in (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        try:
            return np.linalg.cholesky(h + jitter * scale * np.eye(d))
        except np.linalg.LinAlgError:
            continue
    # Only rounding can get here: an eigendecomposition factor is exact for any PSD matrix.
    values, vectors = np.linalg.eigh(h)
    return vectors * np.sqrt(np.maximum(values, 0.0))


def _lloyd(x: np.ndarray, codebook: np.ndarray, iterations: int, tol: float = 1e-4) -> np.ndarray:
    """Lloyd iterations from ``codebook`` (onnxvq.kmeans seeds by k-means++, not from a given
    codebook, so the steps are written here around its threaded assign)."""
    k, d = codebook.shape
    points = np.ascontiguousarray(x, dtype=np.float32)  # what assign computes in, converted once
    previous = math.inf
    for _ in range(iterations):
        codes, dist = assign(points, codebook)
        inertia = float(dist.sum(dtype=np.float64))
        if previous < math.inf and previous - inertia <= tol * previous:
            break
        previous = inertia
        sizes = np.bincount(codes, minlength=k)
        sums = np.stack([np.bincount(codes, weights=x[:, j], minlength=k) for j in range(d)], axis=1)
        updated = np.where(sizes[:, None] > 0, sums / np.maximum(sizes, 1)[:, None], codebook)
        empty = np.flatnonzero(sizes == 0)
        if len(empty):  # deterministic: the points worst served take the unused codewords
            updated[empty] = x[np.argsort(-dist, kind="stable")[: len(empty)]]
        codebook = updated
    return codebook


def _read_npz(path: str) -> tuple[np.ndarray, str]:
    """(codebook float16 (k, d), provenance JSON text) of a codebook file."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise OnnxVQError(f"{path} is not a codebook file (not a readable .npz); {_HINT}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise OnnxVQError(f"{path} is not a codebook file (a single .npy array, not an .npz); {_HINT}")
    with data:
        missing = [key for key in ("codebook", "provenance") if key not in data.files]
        if missing:
            raise OnnxVQError(f"the codebook file {path} has no {' or '.join(missing)} array; {_HINT}")
        try:
            codebook, record = data["codebook"], data["provenance"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            raise OnnxVQError(f"{path} is not a codebook file (a damaged .npz); {_HINT}") from None
    if codebook.dtype != np.float16 or codebook.ndim != 2 or codebook.shape[0] < 2 or codebook.shape[1] < 1:
        raise OnnxVQError(
            f"the codebook in {path} is {codebook.dtype} of shape {codebook.shape}, not float16 (k >= 2, d >= 1); {_HINT}"
        )
    if record.ndim != 0 or record.dtype.kind != "U":
        raise OnnxVQError(f"the codebook file {path} has a damaged provenance record (not a string); {_HINT}")
    return codebook, str(record)


def _content_hash(codebook16: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codebook16, dtype="<f2").tobytes()).hexdigest()


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise OnnxVQError(f"cannot read the model {path}: {e.strerror or e}") from None
    return digest.hexdigest()
