"""The method registry: CLI name -> method class. Adding a method = one module + one line here."""

from __future__ import annotations

from onnxvq.errors import OnnxVQError
from onnxvq.methods.base import Encoded, Method, MethodParams
from onnxvq.methods.lr2vq import LR2VQ, LR2VQParams
from onnxvq.methods.pq import PQ, PQParams
from onnxvq.methods.ssvq import SSVQ, SSVQParams
from onnxvq.methods.vq4all import VQ4ALL, VQ4ALLParams

__all__ = ["LR2VQ", "LR2VQParams", "METHODS", "Encoded", "Method", "MethodParams", "PQ", "PQParams", "SSVQ", "SSVQParams",
           "VQ4ALL", "VQ4ALLParams", "get_method"]

METHODS: dict[str, type[Method]] = {
    PQ.name: PQ,
    LR2VQ.name: LR2VQ,
    SSVQ.name: SSVQ,
    VQ4ALL.name: VQ4ALL,
}


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name``."""
    try:
        return METHODS[name]()
    except KeyError:
        raise OnnxVQError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
