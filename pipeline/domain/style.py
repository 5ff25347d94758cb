"""`adapt.domain: style`: make the labeled source images look like the target camera's.

From the unlabeled target images we estimate their low-level statistics: per-channel mean and
standard deviation (brightness, contrast, colour cast), sharpness (variance of the Laplacian) and
sensor noise (Immerkaer's estimator). Source images are then blurred, moment-matched to a randomly
drawn target image's colour statistics and given Gaussian noise, so that the styled source images
have the target's statistics; the head (or the fine-tuned network) trains on the originals plus
styled copies. torchvision has no "match these statistics" transform, hence the few lines here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

BLUR_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # Gaussian sigmas (pixels at the model input) tried
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
_IMMERKAER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> (N, 1, H, W) luminance (ITU-R BT.601)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """Per image: variance of the Laplacian of the luminance (high = sharp)."""
    return F.conv2d(_luma(x), _LAPLACE).flatten(1).var(1)


def noise_sigma(x: torch.Tensor) -> torch.Tensor:
    """Per image: Immerkaer (1996) fast noise estimate, sqrt(pi/2) / (6 (W-2)(H-2)) * sum |x * N|."""
    r = F.conv2d(_luma(x), _IMMERKAER).abs().flatten(1)
    return math.sqrt(math.pi / 2) * r.mean(1) / 6


@dataclass
class StyleStats:
    """A domain's low-level statistics (medians over its images; colour per image kept for sampling)."""

    mean: list[float]  # per channel, median over images, [0, 1]
    std: list[float]
    sharpness: float
    noise: float
    blur_sigma: float = 0.0  # of the fitted transform (source -> this domain)
    add_noise: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else [round(e, 5) for e in v]) for k, v in asdict(self).items()}


def _to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 255.0


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: mean and standard deviation, (N, 3) each."""
    return x.mean((2, 3)), x.std((2, 3)).clamp(min=1e-3)


def domain_stats(x_uint8: torch.Tensor) -> StyleStats:
    x = _to_float(x_uint8)
    m, s = channel_moments(x)
    return StyleStats(m.median(0).values.tolist(), s.median(0).values.tolist(),
                      float(sharpness(x).median()), float(noise_sigma(x).median()))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


class StyleTransfer:
    """Source uint8 crops -> the same crops under the target's camera (blur, colour moments, noise)."""

    def __init__(self, target_uint8: torch.Tensor, blur_sigma: float = 0.0, add_noise: float = 0.0):
        self.t_mean, self.t_std = channel_moments(_to_float(target_uint8))
        self.blur_sigma, self.add_noise = blur_sigma, add_noise

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = _blur(_to_float(x_uint8), self.blur_sigma)
        m, s = channel_moments(x)
        j = torch.randint(len(self.t_mean), (len(x),), generator=generator)  # a target image's colour per image
        x = (x - m[..., None, None]) / s[..., None, None] * self.t_std[j][..., None, None] + self.t_mean[j][..., None, None]
        if self.add_noise > 0:
            x = x + self.add_noise * torch.randn(x.shape, generator=generator)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)


MEASURE_SIDE = 96  # sharpness and noise are compared at this side at most (see fit_style)


def _at_measure_scale(x_uint8: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`x_uint8` downscaled (antialiased) so its shorter side is at most MEASURE_SIDE, and the factor.
    A 3x3 Laplacian sees only the highest frequencies: when the model input upsamples small photos
    (128 px photos at 224 px) both domains have none there and look alike, however blurred one is."""
    f = max(1.0, min(x_uint8.shape[-2:]) / MEASURE_SIDE)
    if f == 1.0:
        return x_uint8, 1.0
    hw = [round(x_uint8.shape[-2] / f), round(x_uint8.shape[-1] / f)]
    return TF.resize(x_uint8, hw, antialias=True), f


def fit_style(source_uint8: torch.Tensor, target_uint8: torch.Tensor, seed: int = 0,
              sample: int = 64) -> tuple[StyleTransfer, StyleStats, StyleStats]:
    """The transform whose output best matches the target's sharpness and noise (a grid over the blur
    sigma; the noise added is what the target has beyond the blurred source's), and both domains' stats.
    Both are measured at MEASURE_SIDE; the sigma and noise returned are at the model input's scale."""
    g = torch.Generator().manual_seed(seed)
    src = source_uint8[torch.randperm(len(source_uint8), generator=g)[:sample]]
    s_stats, t_stats = domain_stats(_at_measure_scale(source_uint8)[0]), domain_stats(_at_measure_scale(target_uint8)[0])
    f = _at_measure_scale(src)[1]
    best = None
    for sigma in BLUR_GRID:
        blurred = StyleTransfer(target_uint8, sigma * f, 0.0)(src, torch.Generator().manual_seed(seed))
        have = float(noise_sigma(_to_float(_at_measure_scale(blurred)[0])).median())
        add = math.sqrt(max(0.0, t_stats.noise ** 2 - have ** 2)) * f  # white noise averaged over f x f pixels
        styled = StyleTransfer(target_uint8, sigma * f, add)(src, torch.Generator().manual_seed(seed))
        sharp = float(sharpness(_to_float(_at_measure_scale(styled)[0])).median())
        err = abs(math.log(sharp + 1e-8) - math.log(t_stats.sharpness + 1e-8))
        if best is None or err < best[0] - 1e-3:
            best = (err, sigma * f, add)
    _, sigma, add = best
    t_stats.blur_sigma, t_stats.add_noise = sigma, add
    return StyleTransfer(target_uint8, sigma, add), s_stats, t_stats


def style_images(x_uint8: torch.Tensor, transfer: StyleTransfer, copies: int, seed: int) -> torch.Tensor:
    """`copies` styled versions of every image, in order (copy 0 of all images, then copy 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([transfer(x_uint8, g) for _ in range(copies)]) if copies else x_uint8[:0]


def restyled_copies(source_uint8: torch.Tensor, target_uint8: torch.Tensor, seed: int,
                    copies: int) -> tuple[torch.Tensor, StyleStats, StyleStats]:
    """`copies` versions of every source image restyled to the target camera (fit_style, then
    style_images), and both domains' stats: what adapt's `style` trains on and the student sees too."""
    transfer, s_stats, t_stats = fit_style(source_uint8, target_uint8, seed)
    return style_images(source_uint8, transfer, copies, seed), s_stats, t_stats
