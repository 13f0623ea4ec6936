"""Small MNIST-format data sets a net can learn: each class is a bright square at its own place.

Random pixels with random labels (tests/test_data.py) test the reader; training tests need a
signal. Written with test_data's IDX writer, so the files are what `bngraph.data` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.test_data import write_set


def learnable_arrays(seed: int = 0, n_train: int = 600, n_test: int = 200, contrast: float = 1.0,
                     offset: float = 0.0) -> dict[str, np.ndarray]:
    """Class c: noise plus a 6x6 square at row/column given by c; `contrast` and `offset` move
    the pixel statistics (another "domain" with the same classes)."""
    rng = np.random.default_rng(seed)

    def images(labels: np.ndarray) -> np.ndarray:
        x = rng.uniform(0, 80, (len(labels), 28, 28))
        for i, c in enumerate(labels):
            r, k = 3 + 7 * (c // 4), 2 + 6 * (c % 4)
            x[i, r : r + 6, k : k + 6] += 150
        return np.clip(x * contrast + offset, 0, 255).astype(np.uint8)

    y_train, y_test = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    return {
        "train-images-idx3-ubyte": images(y_train),
        "train-labels-idx1-ubyte": y_train.astype(np.uint8),
        "t10k-images-idx3-ubyte": images(y_test),
        "t10k-labels-idx1-ubyte": y_test.astype(np.uint8),
    }


def write_learnable(root: Path, **kwargs) -> Path:
    return write_set(Path(root), learnable_arrays(**kwargs))
