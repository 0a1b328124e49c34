"""Vectorised, batched image transforms on ``N x C x H x W`` tensors (run on the model's device).

These replace the per-sample PIL/torchvision transforms for in-memory datasets: one call processes a whole batch
without a Python loop over samples, so the augmentation runs on the GPU when there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def to_float(x: Tensor, pixel_scale: float) -> Tensor:
    """``x`` as float32 divided by ``pixel_scale`` (255 for uint8 images, 16 for sklearn digits, 1 for floats)."""
    x = x.to(torch.float32)
    return x if pixel_scale == 1.0 else x / pixel_scale


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel standardisation ``(x[:, c] - mean[c]) / std[c]`` of a float ``N x C x H x W`` batch."""
    if x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"batch has {x.shape[1]} channels but mean/std have {len(mean)}/{len(std)} entries")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _rand(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=device, generator=generator)


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip each sample of the batch horizontally (last axis) independently with probability ``p``."""
    flip = _rand(x.shape[0], x.device, generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad each side by ``padding`` then take an independent random ``H x W`` crop per sample.

    Equivalent to ``torchvision.transforms.RandomCrop(size=(H, W), padding=padding)`` (constant 0 fill) applied to
    every sample, done with one gather: the crop origin ``(oy, ox)`` is uniform in ``[0, 2*padding]^2``.
    """
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    span = 2 * padding + 1
    oy = (_rand(n, x.device, generator) * span).long().clamp_(max=span - 1)
    ox = (_rand(n, x.device, generator) * span).long().clamp_(max=span - 1)
    rows = oy[:, None] + torch.arange(h, device=x.device)[None, :]  # N x H
    cols = ox[:, None] + torch.arange(w, device=x.device)[None, :]  # N x W
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    x: Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Batched ``RandomResizedCrop``: per sample, a crop of area ``s*H*W`` (``s ~ U(scale)``) and aspect ratio
    ``r`` (``log r ~ U(log ratio)``), resized bilinearly to ``size``.

    torchvision retries up to 10 times when the crop does not fit; here the crop width/height are instead clamped
    to the image (vectorised, no rejection loop), which only changes the rare extreme-ratio draws.
    """
    n, _, h, w = x.shape
    dev = x.device
    area = (scale[0] + (scale[1] - scale[0]) * _rand(n, dev, generator)) * (h * w)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, dev, generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(1.0, float(w))
    ch = torch.sqrt(area / r).clamp(1.0, float(h))
    x0 = (w - cw) * _rand(n, dev, generator)
    y0 = (h - ch) * _rand(n, dev, generator)
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False convention).
    theta = torch.zeros(n, 2, 3, device=dev, dtype=torch.float32)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], size[0], size[1]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_center_crop(x: Tensor, size: tuple[int, int], crop_ratio: float = 224 / 256) -> Tensor:
    """Batched evaluation transform: bilinear resize of the short side to ``min(size) / crop_ratio`` (256 for a
    224 crop, torchvision's ``Resize(256)``) keeping the aspect ratio, then a ``size`` center crop."""
    h, w = x.shape[-2:]
    short = round(min(size) / crop_ratio)
    nh, nw = (
        (short, max(round(w * short / h), size[1])) if h <= w else (max(round(h * short / w), size[0]), short)
    )
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size[0]) // 2, (nw - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def augment_batch(
    x: Tensor,
    *,
    crop_padding: int = 0,
    hflip: bool = False,
    resized_crop: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply the train-time augmentation of a tensor data module to a float batch (before normalisation).

    ``resized_crop`` (ImageNet-style) takes precedence over ``crop_padding`` (CIFAR-style); ``hflip`` is applied last.
    """
    if resized_crop is not None:
        x = random_resized_crop(x, resized_crop, generator=generator)
    elif crop_padding > 0:
        x = random_crop(x, crop_padding, generator=generator)
    if hflip:
        x = random_hflip(x, generator=generator)
    return x
