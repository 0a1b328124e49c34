"""The GPU path, measured: one ResNet-18 CIFAR-shaped training epoch in prunelab (Lightning ``PruneModule``, the
data module's tensors moved onto the device, ``data.steps_per_call``, ``accel.channels_last``,
``trainer.precision=bf16-mixed``, optionally ``accel.compile``) against a hand-tuned loop on the same device
(data on the device, channels-last, bf16 autocast, the same optional ``torch.compile``, no host synchronisation
per step), dense and masked (90 % random weight sparsity, the masks enforced the way prunelab enforces them:
gradients zeroed before the step, weights re-masked after it). Then the small-model sweep throughput:
10 seeds of LeNet-300-100 as one ``--multirun`` vs ``experiment=vectorized`` (scripts/bench_sweep.py).

Target (issue #17): prunelab within 1.2x of the hand-tuned loop. Without a GPU the script runs the same code on
the CPU with a few hundred images (the CI check that it works) and says so; only GPU figures go into
docs/benchmarks.md as GPU figures.

    python scripts/bench_gpu.py                  # dense + masked epochs, then the sweep
    python scripts/bench_gpu.py --compile        # both sides compiled (torch.compile, inductor)
    python scripts/bench_gpu.py --skip-sweep --images 20000
"""

from __future__ import annotations

import argparse
import contextlib
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
from prunelab.pruning.masks import MaskSet  # noqa: E402

SHAPE = (3, 32, 32)
OPT = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_masks(model: torch.nn.Module, sparsity: float) -> MaskSet:
    g = torch.Generator().manual_seed(0)
    return MaskSet({n: torch.rand(m.shape, generator=g) >= sparsity for n, m in MaskSet.from_model(model).items()})


def data_module(images: int, batch: int) -> SyntheticDataModule:
    dm = SyntheticDataModule(data_dir="/tmp", input_shape=list(SHAPE), num_classes=10, num_train=images,
                             num_test=256, batch_size=batch, val_fraction=0.0)
    dm.setup("fit")
    return dm


def hand_epoch(dm: SyntheticDataModule, device: torch.device, masked: bool, compile_: bool, bf16: bool) -> float:
    """The hand-tuned loop: device-held uint8 -> float batches, channels-last, bf16 autocast, fused SGD step."""
    model = build_model("resnet18", SHAPE, 10).to(device).to(memory_format=torch.channels_last)
    masks = random_masks(model, 0.9).to(device) if masked else None
    if masks is not None:
        masks.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step_model = torch.compile(model) if compile_ else model
    x_all, y_all = (t.to(device) for t in dm.split("train"))
    mean = torch.tensor(dm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dm.std, device=device).view(1, -1, 1, 1)
    b = dm.batch_size
    n = len(x_all) // b
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def one_epoch() -> None:
        perm = torch.randperm(len(x_all), device=device)
        for i in range(n):
            idx = perm[i * b:(i + 1) * b]
            xb = ((x_all[idx].float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(step_model(xb), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is not None:
                masks.mask_grads(model)
            opt.step()
            if masks is not None:
                masks.apply(model)

    one_epoch()  # warm-up (cuDNN autotuning, compilation)
    sync(device)
    t = time.perf_counter()
    one_epoch()
    sync(device)
    return time.perf_counter() - t


class EpochTimer(pl.Callback):
    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def on_train_epoch_start(self, trainer, module):
        sync(self.device)
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        sync(self.device)
        self.times.append(time.perf_counter() - self._t)


def prunelab_epoch(dm: SyntheticDataModule, device: torch.device, masked: bool, compile_: bool, bf16: bool) -> float:
    """prunelab's training loop: Lightning + PruneModule, two epochs (the first warms up), the second timed."""
    model = build_model("resnet18", SHAPE, 10)
    masks = random_masks(model, 0.9) if masked else None
    accel = {"channels_last": True, "compile": compile_, "compile_backend": "inductor"}
    module = PruneModule(model, 10, OPT, {"name": "constant"}, masks=masks, accel=accel)
    timer = EpochTimer(device)
    trainer = pl.Trainer(max_epochs=2, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         precision="bf16-mixed" if bf16 else "32-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.times[-1]


def epochs_table(args, device: torch.device) -> None:
    dm = data_module(args.images, args.batch)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    print(f"ResNet-18, {len(dm.split('train')[0])} images 3x32x32, batch {args.batch}, SGD momentum, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, channels-last, compile {args.compile}; "
          f"median of {args.repeats} (each side warmed up by one epoch)\n")
    print("| model | hand-tuned loop s | prunelab s | ratio |\n|---|---|---|---|")
    for masked in (False, True):
        hand, ours = [], []
        for _ in range(args.repeats):  # interleaved
            hand.append(hand_epoch(dm, device, masked, args.compile, bf16))
            ours.append(prunelab_epoch(dm, device, masked, args.compile, bf16))
        h, p = statistics.median(hand), statistics.median(ours)
        print(f"| {'masked 90 %' if masked else 'dense'} | {h:.3f} | {p:.3f} | {p / h:.3f} |", flush=True)


def sweep_table(args, device: torch.device) -> None:
    from bench_sweep import BASE, time_sweeps

    base = BASE + (["trainer=gpu"] if device.type == "cuda" else [])
    print(f"\nsweep: {args.seeds} seeds of LeNet-300-100 (magnitude 90 %, 1+1 epochs), one process each way")
    times = time_sweeps(1, ["sequential", "vectorized"], 1, base, grid="seeds", seeds=args.seeds)
    print("| variant | wall s | runs / min |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.1f} | {60 * args.seeds / v:.1f} |")
    print(f"\nthroughput vectorized / sequential: {times['sequential'] / times['vectorized']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="training images (default: 50000 GPU, 128 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 256 GPU, 32 CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides (inductor)")
    ap.add_argument("--seeds", type=int, default=None, help="runs of the sweep (default: 10 GPU, 2 CPU)")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    quiet_lightning()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    args.images = args.images or (50_000 if gpu else 128)
    args.batch = args.batch or (256 if gpu else 32)
    args.seeds = args.seeds or (10 if gpu else 2)
    if gpu:
        torch.backends.cudnn.benchmark = True
        print(f"# GPU path: {torch.cuda.get_device_name(0)}\nmachine: {machine()}\n")
    else:
        args.repeats = min(args.repeats, 1)
        print("# GPU path: no GPU found -- the same code on the CPU at a few hundred images (a check that the "
              f"script runs; these are not GPU figures)\nmachine: {machine()}\n")
    epochs_table(args, device)
    if not args.skip_sweep:
        sweep_table(args, device)


if __name__ == "__main__":
    main()
