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

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _mount_root_packages() -> None:
    """Make ``onnxvq.ops`` and ``onnxvq.passes`` importable from the checkout too.

    The repository keeps ``ops/`` and ``passes/`` beside this folder (DESIGN.md: first-class
    folders at the root) and the build installs them as ``onnxvq.ops`` and ``onnxvq.passes``
    (pyproject's ``package-dir``). Run from the repository root, this folder shadows any installed
    copy and has no such subfolders, so each is loaded from its root folder under its installed
    name. Installed, the subfolders exist here and nothing happens.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    for name in ("ops", "passes"):
        full_name, folder = f"{__name__}.{name}", _os.path.join(root, name)
        init = _os.path.join(folder, "__init__.py")
        if full_name in _sys.modules or _os.path.isdir(_os.path.join(here, name)) or not _os.path.isfile(init):
            continue
        spec = _importlib_util.spec_from_file_location(full_name, init, submodule_search_locations=[folder])
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[full_name] = module
        spec.loader.exec_module(module)
        globals()[name] = module  # what the import system does for a submodule it loads


_mount_root_packages()

from onnxvq.api import CompressResult, compress, decompress  # noqa: E402 (after the mount)
from onnxvq.config import CompressConfig  # noqa: E402
from onnxvq.errors import OnnxVQError  # noqa: E402

__all__ = ["CompressConfig", "CompressResult", "OnnxVQError", "__version__", "compress", "decompress"]

__version__ = "0.1.0"
