"""Image decoding and preprocessing with numpy and PIL only.

This reproduces, operation for operation, the training side's evaluation
transform (torchvision v2 on PIL images: Resize(shorter side, bilinear) ->
CenterCrop -> PILToTensor -> ToDtype(float32, scale=True) -> Normalize; for a
rectangular H x W input, Resize((h, w)) to an exact size, then CenterCrop((H, W))). Resize
and crop go through PIL exactly as torchvision does for PIL inputs, so the
pixels are identical; only the float normalisation is re-done here. The
training side decodes images with `open_image` below, so EXIF orientation and
mode conversion are the same on both sides.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import ImageError, ImageTooLargeError

# Decompression-bomb guard: images with more pixels than this are refused before
# they are decoded. 50 MP covers every phone and DSLR photo; a 100 MP PNG of
# zeros is a few kB on disk and 300 MB once decoded.
MAX_PIXELS = 50_000_000

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


Size = int | tuple[int, int]  # a square side, or (height, width)


def size_hw(size: Size | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a square side or an (H, W) pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _size(v: Any) -> Size:
    """A bundle.json / config size: an int, or [H, W] (kept an int when both sides are equal)."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"a size is an int or [height, width], got {list(v)}")
        h, w = int(v[0]), int(v[1])
        return h if h == w else (h, w)
    return int(v)


@dataclass(frozen=True)
class PreprocessSpec:
    """What bundle.json's "preprocess" section holds.

    Square inputs (`crop` an int): resize the shorter side to `resize`, center-crop `crop` x `crop`.
    Rectangular inputs (`crop` = (H, W)): resize to exactly `resize` = (h, w), center-crop H x W --
    torchvision's own meaning of an int and a pair in Resize and CenterCrop.
    """

    resize: Size  # shorter side after resize, or the exact (h, w) after resize
    crop: Size  # square center crop, or (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if isinstance(self.crop, tuple) != isinstance(self.resize, tuple):
            raise ValueError(f"resize and crop must both be ints (square) or both [height, width], "
                             f"got resize={self.resize} crop={self.crop}")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return size_hw(self.crop)

    @property
    def height(self) -> int:
        return self.hw[0]

    @property
    def width(self) -> int:
        return self.hw[1]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        if d.get("interpolation", "bilinear") not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}")
        return cls(
            resize=_size(d["resize"]),
            crop=_size(d["crop"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
            "crop": list(self.crop) if isinstance(self.crop, tuple) else self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "color": "RGB",
            "layout": "NCHW",
            "scale": "1/255",
        }


ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def open_image(src: ImageInput, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode any supported input into an RGB PIL image (EXIF orientation applied).

    Grayscale, 16-bit, RGBA/LA (alpha dropped), palette and CMYK images are
    converted with PIL's own conversions; images over `max_pixels` raise
    ImageTooLargeError before any pixel is decoded.
    """
    name = "<image>"
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = _from_array(src)
        else:
            if isinstance(src, (bytes, bytearray, memoryview)):
                fp = io.BytesIO(bytes(src))
            else:
                fp = name = os.fspath(src)
            with warnings.catch_warnings():
                if max_pixels is not None:  # our own limit below answers it; PIL's warning would only add log noise
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: image is {img.width}x{img.height} = {img.width * img.height / 1e6:.1f} megapixels, "
                f"over the limit of {max_pixels / 1e6:.1f} megapixels; downscale it first"
            )
        img.load()  # decode fully now so truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            # 16/32-bit grayscale: PIL's convert("RGB") clips at 255, so scale to 8 bits first.
            a = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
            img = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
        if img.mode != "RGB":
            # CMYK, palette, grayscale and alpha images: PIL's own conversion (alpha dropped).
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL's advice for palette transparency; alpha then dropped
            img = img.convert("RGB")
        return img
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (no decoder recognises its format; send PNG, JPEG, WebP, BMP, ...)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode image ({e.__class__.__name__}: {e})") from None


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"numpy images must be uint8 HxW or HxWxC, got dtype {a.dtype}")
    if a.ndim == 2:
        return Image.fromarray(a, mode="L")
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        if a.shape[2] == 1:
            return Image.fromarray(a[:, :, 0], mode="L")
        return Image.fromarray(a, mode="RGB" if a.shape[2] == 3 else "RGBA")
    raise ImageError(f"numpy images must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `shorter`, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shorter * long / short)
    return (shorter, new_long) if width <= height else (new_long, shorter)


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    if isinstance(spec.resize, tuple):
        h, w = spec.resize
    else:
        w, h = resized_size(img.width, img.height, spec.resize)
    if (w, h) != img.size:
        img = img.resize((w, h), _INTERPOLATION[spec.interpolation])
    ch, cw = spec.hw
    if ch > h or cw > w:
        raise ImageError(f"crop {cw}x{ch} is larger than the resized image {w}x{h}")
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def to_tensor(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB PIL image (already resized and cropped) -> float32 CHW, normalised."""
    a = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    a = a.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (a - mean) / std


def preprocess(images: Sequence[ImageInput], spec: PreprocessSpec, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode and preprocess a list of images into one float32 NCHW batch."""
    out = np.empty((len(images), 3, *spec.hw), dtype=np.float32)
    for i, src in enumerate(images):
        out[i] = to_tensor(resize_and_crop(open_image(src, max_pixels=max_pixels), spec), spec)
    return out


def as_image_list(inputs: Any) -> list[ImageInput]:
    """Accept one image or many: a path, PIL image, bytes, HxWxC array, NxHxWxC array or a list."""
    if isinstance(inputs, (str, os.PathLike, bytes, Image.Image)):
        return [inputs]
    if isinstance(inputs, Path):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 4:
            return list(inputs)
        return [inputs]
    return list(inputs)
