"""From an :class:`~onnxvq.methods.Encoded` value to the tensors and attributes a VQ node stores."""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxvq.methods.base import Encoded
from onnxvq.ops import vq_weight
from onnxvq.ops.codes import code_bits_for_k, pack_codes


__all__ = ["CODEBOOK_DTYPES", "PackedWeight", "pack"]

CODEBOOK_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """The stored form of one encoded weight (shared by every node that consumes it)."""

    method: str
    codes: np.ndarray
    codebook: np.ndarray
    code_bits: int
    weight_shape: tuple[int, ...]
    weight_dtype: int  # onnx TensorProto element type
    stats: dict
    extras: dict = dataclasses.field(default_factory=dict)  # see Encoded.extras

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def d(self) -> int:
        """Length of a decoded codeword (the subvector length)."""
        projection = self.extras.get("projection")
        return int((projection if projection is not None else self.codebook).shape[1])

    @property
    def rank(self) -> int | None:
        """The clustering dimension of a low-rank codebook (``None`` for a plain one)."""
        projection = self.extras.get("projection")
        return None if projection is None else int(projection.shape[0])

    @property
    def shared_codebook(self) -> str | None:
        """The content hash of a universal codebook that every node of the model shares
        (``vq4all``; stored once, not counted in this weight's bytes), else None."""
        return self.stats.get("universal_codebook")

    @property
    def nbytes(self) -> int:
        codebook = 0 if self.shared_codebook else self.codebook.nbytes
        return int(self.codes.nbytes + codebook + sum(a.nbytes for a in self.extras.values()))

    @property
    def literature_nbytes(self) -> float:
        """Bytes by the literature's convention: codes at log2(k) bits, float tables (codebook,
        projection) at fp16, bit-packed extras (signs) as stored; a shared codebook is counted
        once per model, not here."""
        floats = (0 if self.shared_codebook else self.codebook.size) + sum(
            a.size for a in self.extras.values() if a.dtype.kind == "f")
        packed_bits = sum(a.nbytes for a in self.extras.values() if a.dtype.kind != "f")
        return self.code_nbits / 8 + 2.0 * floats + packed_bits

    @property
    def code_nbits(self) -> float:
        """Bits of the codes at log2(k) each, unpadded: the literature's convention."""
        n_codes = self.codes.shape[0] * (self.codes.shape[1] * (2 if self.code_bits == 4 else 1))
        return float(n_codes * max(1.0, np.log2(self.k)))

    def attributes(self) -> dict:
        """The VQ attributes of ``onnxvq.ops.vq_weight`` (consumer attributes excluded)."""
        return {
            "weight_shape": np.asarray(self.weight_shape, np.int64),
            "weight_dtype": int(self.weight_dtype),
            "code_bits": int(self.code_bits),
            "method": self.method,
            "extra_inputs": ",".join(e for e in vq_weight.EXTRA_INPUTS if e in self.extras),
        }

    def decode(self, *, transposed: bool) -> np.ndarray:
        return vq_weight.decode_weight(
            self.codes,
            self.codebook,
            weight_shape=self.weight_shape,
            weight_dtype=self.weight_dtype,
            code_bits=self.code_bits,
            transposed=transposed,
            **self.extras,
        )


def pack(
    encoded: Encoded, *, weight_shape, weight_dtype: int, codebook_dtype: str
) -> PackedWeight:
    """Pack codes to 4/8/16 bits and store the codebook (and the floating extras, such as a
    low-rank projection) at ``codebook_dtype``; integer extras (packed signs) are kept as they are.

    A float16 table whose values overflow float16, or that float16 cannot hold to 0.1% (RMS,
    relative: weights around 1e-8 fall below its range and would decode to zeros), is kept in
    float32 (noted in ``stats``).
    """
    code_bits = code_bits_for_k(encoded.k)
    stats = dict(encoded.stats)

    def stored(table: np.ndarray) -> np.ndarray:
        if table.dtype.kind != "f":
            return table
        dtype = CODEBOOK_DTYPES[codebook_dtype]
        with np.errstate(over="ignore", under="ignore"):
            cast = table.astype(dtype)
        if not np.isfinite(cast).all():
            stats["codebook_dtype_note"] = f"{np.dtype(dtype).name} overflow, kept float32"
            return table.astype(np.float32)
        table32 = table.astype(np.float32)
        # float64: the norms of weights around 1e-30 underflow in float32.
        error = np.linalg.norm(cast.astype(np.float64) - table32)
        if error > 1e-3 * np.linalg.norm(table32.astype(np.float64)):
            stats["codebook_dtype_note"] = f"values below {np.dtype(dtype).name}'s range, kept float32"
            return table32
        return cast

    codebook = stored(encoded.codebook)
    extras = {name: stored(np.asarray(encoded.extras[name])) for name in vq_weight.EXTRA_INPUTS if name in encoded.extras}
    unknown = set(encoded.extras) - set(vq_weight.EXTRA_INPUTS)
    if unknown:
        raise ValueError(f"unknown encoded extras {sorted(unknown)}; known: {vq_weight.EXTRA_INPUTS}")
    return PackedWeight(
        method=encoded.method,
        codes=pack_codes(encoded.codes, code_bits),
        codebook=codebook,
        code_bits=code_bits,
        weight_shape=tuple(int(s) for s in weight_shape),
        weight_dtype=int(weight_dtype),
        stats=stats,
        extras=extras,
    )
