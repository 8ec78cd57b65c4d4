"""The method registry: CLI name -> method class. Adding a method = one module + one line here."""

from __future__ import annotations

from onnxvq.errors import OnnxVQError
from onnxvq.methods.base import Encoded, Method, MethodParams
from onnxvq.methods.pq import PQ, PQParams

__all__ = ["METHODS", "Encoded", "Method", "MethodParams", "PQ", "PQParams", "get_method"]

METHODS: dict[str, type[Method]] = {
    PQ.name: PQ,
}


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name``."""
    try:
        return METHODS[name]()
    except KeyError:
        raise OnnxVQError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
