"""Image decode and crop on uint8, chosen for speed on one CPU core.

JPEGs are decoded by libjpeg-turbo through simplejpeg with its fast IDCT and upsampling
(about 1.2x torchvision.io here; DCT-domain downscaling was measured slower at 3/4 and 1/2
on 320-512 px photos, so it is not used). The size check comes from the header, before any
pixel is decoded. The crop box is cut from the uint8 array as a view and resized once with
antialiased bilinear interpolation, which torch runs on uint8 channels-last data with SIMD.
Normalization happens later, on the device.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from mmscale.data.imagefile import open_image, rgb_on_white
from mmscale.data.tars import SampleRejected


@dataclass(frozen=True)
class CropBox:
    """A crop in source-image pixels: top, left, height, width."""

    top: int
    left: int
    height: int
    width: int


def image_size(data: bytes, extension: str, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone; SampleRejected (`corrupt_image`, `not_an_image`, or
    `image_too_large` above `max_pixels`) otherwise."""
    if extension in ("jpg", "jpeg"):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            pass  # not a baseline JPEG header simplejpeg knows; PIL may still read it
    with open_image(data, max_pixels=max_pixels) as image:
        return image.size


def random_resized_crop_box(
    width: int, height: int, *, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> CropBox:
    """torchvision's RandomResizedCrop box sampling, with an explicit RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return CropBox(top, left, crop_height, crop_width)
    # Fallback to a central crop, as torchvision does.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_height, crop_width = height, int(round(height * ratio[1]))
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def center_crop_box(width: int, height: int) -> CropBox:
    """The central square: resize-shorter-side-then-center-crop in one box."""
    side = min(width, height)
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def _decode(data: bytes, extension: str, *, max_pixels: int) -> np.ndarray:
    """Decode to an RGB uint8 HWC array: libjpeg-turbo for JPEG, PIL for the rest."""
    if extension in ("jpg", "jpeg"):
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True)
        except ValueError:
            pass  # CMYK, unusual layouts, or corrupt: PIL decides which
    with open_image(data, max_pixels=max_pixels) as image:
        try:
            return np.array(rgb_on_white(image))
        except Exception as error:  # corrupt or truncated data surfaces as many exception types
            raise SampleRejected("corrupt_image", str(error)) from None


def decode_and_crop(
    data: bytes, extension: str, *, size: int, max_pixels: int, rng: random.Random | None = None,
    scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3),
    hflip_probability: float = 0.0,
) -> torch.Tensor:
    """A uint8 [3, size, size] image: random resized crop (+ flip) with `rng`, else center crop.

    Raises SampleRejected with reason `empty_member`, `image_too_large` or `corrupt_image`.
    """
    if not data:
        raise SampleRejected("empty_member", "zero-byte image")
    width, height = image_size(data, extension, max_pixels=max_pixels)
    if width * height > max_pixels:
        raise SampleRejected("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    if width < 1 or height < 1:
        raise SampleRejected("corrupt_image", f"size {width}x{height}")
    if rng is None:
        box = center_crop_box(width, height)
    else:
        box = random_resized_crop_box(width, height, scale=scale, ratio=ratio, rng=rng)
    pixels = _decode(data, extension, max_pixels=max_pixels)
    if pixels.shape[:2] != (height, width):
        decoded = f"{pixels.shape[1]}x{pixels.shape[0]}"
        raise SampleRejected("corrupt_image", f"header says {width}x{height}, decoded {decoded}")
    region = torch.from_numpy(pixels).permute(2, 0, 1)[:, box.top:box.top + box.height, box.left:box.left + box.width]
    if region.shape[1:] != (size, size):
        # A dense channels-last copy takes torch's SIMD uint8 path: 180 us instead of 300 us
        # for a strided view of the crop (measured on 320-512 px photos).
        region = region[None].contiguous(memory_format=torch.channels_last)
        region = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True)[0]
    if rng is not None and hflip_probability > 0 and rng.random() < hflip_probability:
        region = region.flip(-1)
    return region
