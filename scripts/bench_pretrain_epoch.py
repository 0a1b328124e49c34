"""One prunelab pretraining epoch vs a plain hand-written PyTorch loop: same model (LeNet-300-100), same
MNIST-sized data (60,000 synthetic 1x28x28 images held as tensors), same batch size and optimiser.

prunelab's epoch is the real thing: a Lightning Trainer fitting PruneModule on the SyntheticDataModule (batches
served by index, ``data.steps_per_call`` of them per Lightning step (default 10; ``--steps-per-call 1`` for one),
normalised in ``on_after_batch_transfer``), no validation, no logger. Target: ratio <= 1.10. Single epochs of a
small model vary by +-15 % on a shared 2-core machine: the ratio is the median of interleaved pairs, with its IQR.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine  # noqa: E402

from prunelab.cli import quiet_lightning  # noqa: E402
from prunelab.data import SyntheticDataModule  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.pipeline.module import PruneModule  # noqa: E402

OPT = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, from its first batch fetch to its end (fit() set-up excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self._t)


def prunelab_epoch(dm, batch: int, steps_per_call: int) -> tuple[float, float]:
    """(epoch time, whole fit() time including Trainer set-up) for one epoch."""
    dm.steps_per_call = steps_per_call
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    module = PruneModule(model, 10, OPT, {"name": "constant"})
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[timer])
    t = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return timer.times[0], time.perf_counter() - t


def plain_epoch(dm, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    t = time.perf_counter()
    perm = torch.randperm(len(x))
    model.train()
    for i in range(len(x) // batch):
        idx = perm[i * batch:(i + 1) * batch]
        xb, yb = dm.process_batch(x[idx], y[idx], train=True)  # the same uint8 -> float normalisation
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps-per-call", type=int, default=10, help="data.steps_per_call (1: one batch per step)")
    args = ap.parse_args()
    quiet_lightning()
    dm = SyntheticDataModule(data_dir="/tmp", input_shape=[1, 28, 28], num_classes=10, num_train=66_667,
                             num_test=1000, batch_size=args.batch, val_fraction=0.1)
    dm.setup("fit")
    x, y = dm.split("train")
    times = {"prunelab": [], "prunelab fit() incl. set-up": [], "plain": []}
    prunelab_epoch(dm, args.batch, args.steps_per_call)  # warm-up
    plain_epoch(dm, x, y, args.batch)
    for _ in range(args.repeats):  # interleaved pairs: a drift of the machine's speed hits both alike
        epoch, whole = prunelab_epoch(dm, args.batch, args.steps_per_call)
        times["prunelab"].append(epoch)
        times["prunelab fit() incl. set-up"].append(whole)
        times["plain"].append(plain_epoch(dm, x, y, args.batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = sorted(a / b for a, b in zip(times["prunelab"], times["plain"]))
    q1, q3 = statistics.quantiles(ratios, n=4)[0::2] if len(ratios) > 1 else (ratios[0], ratios[0])
    print(f"# pretraining epoch: prunelab (Lightning) vs plain PyTorch loop\nmachine: {machine()}\n")
    print(f"LeNet-300-100, {len(x)} training images 1x28x28, batch {args.batch}, SGD momentum, "
          f"data.steps_per_call={args.steps_per_call}, {args.repeats} interleaved pairs")
    print("| loop | epoch s (median) |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nratio prunelab epoch / plain: median of pairs {statistics.median(ratios):.3f} "
          f"(IQR {q1:.3f}-{q3:.3f}); of medians {med['prunelab'] / med['plain']:.3f}")
    print(f"ratio prunelab fit() incl. set-up / plain: {med['prunelab fit() incl. set-up'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
