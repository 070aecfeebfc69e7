"""Two random views of every image, for GPS's supervised-contrastive scores (its authors' contrastive augmentation).

Each view, in this order (the SupCon / SimCLR recipe GPS's code applies to the gradient pass, on PIL images):

1. random resized crop back to the input size: area fraction in [0.08, 1], aspect ratio log-uniform in
   [3/4, 4/3], 10 tries, else a centre crop of the clamped ratio; bicubic, antialiased;
2. horizontal flip with p = 0.5;
3. with p = 0.8, colour jitter (brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) in a random order;
4. grayscale (3 channels) with p = 0.2.

On tensors: the scorer receives normalised batches, so every image is taken back to [0, 1] with the data's mean and
std, augmented with ``torchvision.transforms.v2.functional`` and normalised again. The random parameters come from
the caller's CPU ``torch.Generator`` (drawn per image, in order), so the views are the same on every device and
every call with the same seed, and the global RNG is untouched.

Differs from the authors' pipeline: they crop the image file (VTAB-1k stores images at their source resolution),
here the image already resized to the model's input (bicubic, no crop) is cropped and resized again, so a small
crop is upsampled from fewer source pixels; values are clamped to [0, 1] after the bicubic resize (PIL's uint8
does the same), but not quantised to 8 bits.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

SCALE = (0.08, 1.0)  # crop area fraction
RATIO = (3 / 4, 4 / 3)  # crop aspect ratio (width / height)
FLIP_P, JITTER_P, GRAY_P = 0.5, 0.8, 0.2
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=g))


def crop_box(height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop (torchvision's RandomResizedCrop.get_params, seeded by ``g``)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * _uniform(g, *SCALE)
        aspect = math.exp(_uniform(g, *log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, height - h + 1), _randint(g, 0, width - w + 1), h, w
    ratio = width / height  # fallback: the whole image, aspect clamped to RATIO, centred
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def augment(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of ``image`` (3, H, W) in [0, 1]: crop + resize, flip, colour jitter, grayscale."""
    height, width = image.shape[-2:]
    top, left, h, w = crop_box(height, width, g)
    out = TF.resized_crop(image, top, left, h, w, [height, width], InterpolationMode.BICUBIC, antialias=True)
    out = out.clamp(0.0, 1.0)  # bicubic overshoot; PIL's uint8 clamps as well
    if float(torch.rand((), generator=g)) < FLIP_P:
        out = TF.horizontal_flip(out)
    if float(torch.rand((), generator=g)) < JITTER_P:
        b, c, s, hue = JITTER
        order = torch.randperm(4, generator=g).tolist()
        factors = [_uniform(g, 1 - b, 1 + b), _uniform(g, 1 - c, 1 + c), _uniform(g, 1 - s, 1 + s)]
        factors.append(_uniform(g, -hue, hue))
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for i in order:
            out = ops[i](out, factors[i])
    if float(torch.rand((), generator=g)) < GRAY_P:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return out


def two_views(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], g: torch.Generator
) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> (2B, 3, H, W) normalised: the first view of every image, then the second.

    Rows i and B + i are the two views of image i (the authors concatenate the two views' batches so).
    """
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1)
    images = (x.float() * s + m).clamp(0.0, 1.0)  # (B, 3, H, W) in [0, 1]
    views = [augment(images[i], g) for _ in range(2) for i in range(len(images))]  # view 1 of all, then view 2
    return ((torch.stack(views) - m) / s).to(x.dtype)  # (2B, 3, H, W)
