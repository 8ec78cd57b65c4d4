"""The contract between methods and the rest of onnxvq.

A method turns one weight into an :class:`Encoded` value (numpy only): integer codes, a float32
codebook, and per method extra tensors and attributes. It sees the weight through the single
layout of :mod:`onnxvq.layout` (given as ``transposed`` and ``row_axes``), never through graph
details, so no pass, CLI or config code branches on method names: they only look methods up in
the registry (:mod:`onnxvq.methods`) by their CLI name.

Each method also supplies its trainable torch module (:meth:`Method.trainable`) for the fine-tune
bridge, which trains and writes back through that module alone, never branching on the method.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from typing import TYPE_CHECKING

import numpy as np

from onnxvq.layout import WeightLayout
from onnxvq.ops.codes import MAX_K, code_bits_for_k, packed_nbytes

if TYPE_CHECKING:  # torch stays unimported until fine-tuning
    from onnxvq.activations import LayerInputs
    from onnxvq.finetune.trainable import TrainableWeight

__all__ = ["Encoded", "Method", "MethodParams", "point_weights"]


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """Parameters every method has; each method subclasses this with its own.

    Attributes:
        k: codewords per codebook, 2..65536 (capped per layer by its number of subvectors).
        d: subvector length; about ``log2(k) / d`` bits per weight.
    """

    k: int = 256
    d: int = 8

    def __post_init__(self) -> None:
        for name in ("k", "d"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.k < 2:
            raise ValueError(f"k must be at least 2 (got {self.k})")
        if self.k > MAX_K:
            raise ValueError(f"k must be at most {MAX_K} (got {self.k})")
        if self.d < 1:
            raise ValueError(f"d must be at least 1 (got {self.d})")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One weight, encoded.

    Attributes:
        method: registry name of the method that produced it.
        codes: (rows, n_sub) integer indices into ``codebook``.
        codebook: (k, d) float32 for plain PQ; (k, rank) with a ``projection``.
        extras: the method's further tensors, by the names of ``onnxvq.ops.vq_weight.EXTRA_INPUTS``
            (``projection``: (rank, d) float32, decoded codebook ``codebook @ projection``;
            ``signs``: (rows, ceil(cols / 8)) uint8, packed by ``onnxvq.ops.signs``). Floating
            extras are stored at the codebook's dtype, integer ones as they are.
        stats: numbers worth reporting (iterations, inertia, ...), JSON-serialisable.
    """

    method: str
    codes: np.ndarray
    codebook: np.ndarray
    stats: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0])

class Method(abc.ABC):
    """A weight encoder. Subclasses set ``name`` (the CLI string) and ``Params``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Per-channel scales this method always uses, whatever the config says (None: the config's).
    forced_scales: ClassVar[str | None] = None

    def fixed_k_d(self, values: dict) -> tuple[int, int] | None:
        """(k, d) that this method's parameters ``values`` (a mapping of settings) fix, whatever
        the config says, or None (the config's)."""
        return None

    def fixed_codebook(self, params: MethodParams) -> np.ndarray | None:
        """The (k, d) float32 codebook every layer of this method reads, whatever its weights
        (a size target then offers that one encoding, not a ladder), or None (one per layer)."""
        return None

    @abc.abstractmethod
    def encode(
        self,
        weight: np.ndarray,
        *,
        transposed: bool,
        row_axes: int,
        params: MethodParams,
        seed: np.random.SeedSequence,
        inputs: LayerInputs | None = None,
    ) -> Encoded:
        """Encode ``weight`` (float32, any rank >= 2) seen through ``onnxvq.layout``.

        With ``inputs`` (calibration statistics of what the weight multiplies, see
        :mod:`onnxvq.activations`), minimise the layer's output error on that data instead of
        its weight error: under ``inputs.hessian`` when it is given, and with each row's
        subvectors weighted by ``inputs.row_weights`` when those are (an embedding table, whose
        rows are read at different rates: :func:`point_weights`).
        """

    @abc.abstractmethod
    def trainable(self, encoded: Encoded, layout: WeightLayout, params: MethodParams) -> TrainableWeight:
        """A torch module (see :class:`onnxvq.finetune.trainable.TrainableWeight`) whose
        parameters are this method's tensors, for the fine-tune bridge. ``params`` are the ones
        the weight was encoded with (a method's training options live there). Imports torch
        lazily."""

    def stored_nbytes(self, layout: WeightLayout, params: MethodParams, codebook_itemsize: int) -> int:
        """Upper bound of the encoded bytes of a weight of ``layout`` (decides whether encoding a
        small layer is worth it): codes plus a k x d codebook; methods with extras add theirs."""
        k = min(params.k, layout.rows * layout.n_sub)
        return packed_nbytes(layout.rows, layout.n_sub, code_bits_for_k(k)) + k * layout.d * codebook_itemsize


def point_weights(inputs: LayerInputs | None, layout: WeightLayout) -> np.ndarray | None:
    """The k-means weight of each of a layer's (rows * n_sub) subvectors, in row-major order: its
    row's ``inputs.row_weights``, or None (all equal) without them."""
    if inputs is None or inputs.row_weights is None:
        return None
    return np.repeat(np.asarray(inputs.row_weights, np.float64), layout.n_sub)
