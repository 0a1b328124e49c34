"""Write outputs/mnist10k.npz (8,000 train / 2,000 test) from the real MNIST test set in
../shared/datasets/mnist-t10k, for reduced-scale accuracy checks on real data (no download needed)."""

import gzip
import sys
from pathlib import Path

import numpy as np

src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/datasets/mnist-t10k")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "outputs/mnist10k.npz")
x = np.frombuffer(gzip.open(src / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
y = np.frombuffer(gzip.open(src / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8).astype(np.int64)
out.parent.mkdir(parents=True, exist_ok=True)
np.savez(out, x=x[:8000], y=y[:8000], x_test=x[8000:], y_test=y[8000:])
print(f"wrote {out}: {len(x)} images")
