"""Decode and crop on uint8: sizes, colour modes, crop geometry."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.data.tars import SampleRejected
from mmscale.data.transforms import decode_and_crop, image_size, random_resized_crop_box


def encoded(mode: str, size=(64, 48), fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def smooth(mode: str, size=(64, 48), fmt="JPEG") -> bytes:
    """Colour gradients in `mode` (half-transparent where it has alpha), encoded as `fmt`."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    image = Image.fromarray(np.stack([x * 220 + 20, y * 200 + 30, (1 - x) * 180 + 40], axis=-1).astype(np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray((y * 255).astype(np.uint8)))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, fmt, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt, extension", [
    ("RGB", "JPEG", "jpg"), ("L", "JPEG", "jpg"), ("CMYK", "JPEG", "jpg"),
    ("RGBA", "PNG", "png"), ("P", "PNG", "png"), ("RGB", "WEBP", "webp"),
])
def test_every_colour_mode_becomes_three_channel_uint8_with_pils_colours(mode, fmt, extension):
    data = smooth(mode, fmt=fmt)
    assert image_size(data, extension, max_pixels=10**6) == (64, 48)
    image = decode_and_crop(data, extension, size=32, max_pixels=10**6, rng=random.Random(0))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    # Pixel values against PIL's own conversion of the same file (transparent parts over white), centre-cropped
    # and resized as the evaluation path does.
    centred = decode_and_crop(data, extension, size=32, max_pixels=10**6)
    source = Image.open(io.BytesIO(data))
    if "A" in source.getbands():
        rgba = source.convert("RGBA")
        source = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    reference = np.asarray(source.convert("RGB").crop((8, 0, 56, 48)).resize((32, 32), Image.BILINEAR))
    difference = np.abs(centred.permute(1, 2, 0).numpy().astype(int) - reference.astype(int))
    assert difference.mean() < 4, difference.mean()


def test_center_crop_matches_resize_of_the_central_square():
    data = encoded("RGB", size=(96, 64), fmt="PNG")
    image = decode_and_crop(data, "png", size=32, max_pixels=10**6)
    reference = np.asarray(Image.open(io.BytesIO(data)).crop((16, 0, 80, 64)).resize((32, 32), Image.BILINEAR))
    assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).mean() < 3


def test_random_crop_boxes_stay_inside_and_follow_the_scale_range():
    rng = random.Random(1)
    for _ in range(500):
        box = random_resized_crop_box(300, 200, scale=(0.3, 0.6), ratio=(0.75, 4 / 3), rng=rng)
        assert 0 <= box.top and box.top + box.height <= 200 and 0 <= box.left and box.left + box.width <= 300
        assert 0.28 <= box.width * box.height / 60_000 <= 0.62


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(SampleRejected) as error:
        decode_and_crop(encoded("RGB"), "jpg", size=32, max_pixels=1000)
    assert error.value.reason == "image_too_large"


def test_pixel_limit_rejects_a_bomb_from_its_header_without_decoding_it():
    from corpus import bomb_png

    # 30,000 x 30,000 in the header but only a few bytes of pixel data: decoding would fail
    # as corrupt, so `image_too_large` shows the header was checked first.
    with pytest.raises(SampleRejected) as error:
        decode_and_crop(bomb_png(), "png", size=32, max_pixels=89_478_485)
    assert error.value.reason == "image_too_large"


def test_horizontal_flip_mirrors_the_same_crop():
    data = encoded("RGB", size=(96, 64))
    plain = decode_and_crop(data, "jpg", size=32, max_pixels=10**6, rng=random.Random(5), hflip_probability=0.0)
    flipped = decode_and_crop(data, "jpg", size=32, max_pixels=10**6, rng=random.Random(5), hflip_probability=1.0)
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
