"""onnxvq: post-training vector quantization of ONNX models.

Conv, Gemm and MatMul weights become codes and codebooks in ``ai.onnxvq`` custom ops that carry
standard-op function bodies, so the compressed model runs in stock onnxruntime.

Example::

    import onnxvq
    result = onnxvq.compress("model.onnx", method="pq", k=256, d=8)
    print(result.summary.format())
    result.save("model.vq.onnx")

``import onnxvq`` never imports torch.
"""

from onnxvq.api import CompressResult, compress, decompress
from onnxvq.config import CompressConfig
from onnxvq.errors import OnnxVQError

__all__ = ["CompressConfig", "CompressResult", "OnnxVQError", "__version__", "compress", "decompress"]

__version__ = "0.1.0"
