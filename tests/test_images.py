"""prepare_image: bytes kept when possible, resize, RGB conversion, and each rejection reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from corpus import bomb_png, image_bytes
from PIL import Image

from mmscale.shards.images import ImageOptions, SampleRejected, prepare_image


def test_jpeg_within_size_keeps_its_bytes_and_larger_ones_shrink():
    small = image_bytes((40, 30))
    assert prepare_image(small, ImageOptions(resize=64)).jpeg == small
    big = prepare_image(image_bytes((200, 100)), ImageOptions(resize=64, jpeg_quality=70))
    assert (big.width, big.height, big.original_width, big.original_height) == (128, 64, 200, 100)
    assert Image.open(io.BytesIO(big.jpeg)).size == (128, 64)


def smooth_image(mode: str, size=(30, 20)) -> Image.Image:
    """Colour gradients (JPEG keeps them within a few levels) with half-transparent pixels for alpha modes."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    rgb = np.stack([x * 220 + 20, y * 200 + 30, (1 - x) * 180 + 40], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray((x * 255).astype(np.uint8)))
    if mode == "P":  # an adaptive palette without dithering: smooth, so JPEG's loss stays small
        return image.quantize(256, dither=Image.Dither.NONE)
    return image.convert(mode)


def pil_rgb(image: Image.Image) -> np.ndarray:
    """PIL's own conversion to RGB, transparent parts over white (what the shard writer promises)."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK"])
def test_other_formats_and_modes_become_rgb_jpeg_with_pils_colours(mode):
    source = smooth_image(mode)
    buffer = io.BytesIO()
    source.save(buffer, "JPEG" if mode == "CMYK" else "PNG", quality=95)
    prepared = prepare_image(buffer.getvalue(), ImageOptions())
    decoded = Image.open(io.BytesIO(prepared.jpeg))
    assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (30, 20))
    # Pixel values: PIL's own conversion of the same decoded source, within JPEG's loss on smooth gradients.
    reference = pil_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    difference = np.abs(np.asarray(decoded).astype(int) - reference.astype(int))
    # (JPEG at quality 90 alone moves these 30 x 20 gradients by ~3 levels on average; a wrong conversion by 20+.)
    assert difference.mean() < 5 and np.percentile(difference, 99) < 20, (difference.mean(), difference.max())


def test_transparent_pixels_become_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, "PNG")
    decoded = Image.open(io.BytesIO(prepare_image(buffer.getvalue(), ImageOptions()).jpeg))
    assert min(decoded.getpixel((4, 4))) > 245


@pytest.mark.parametrize("data, options, reason", [
    (b"", ImageOptions(), "empty_member"),
    (b"GIF89a nonsense", ImageOptions(), "corrupt_image"),
    (image_bytes((64, 64))[:300], ImageOptions(), "corrupt_image"),
    (bomb_png(), ImageOptions(), "image_too_large"),
    (bomb_png(200, 200), ImageOptions(max_pixels=100 * 100), "image_too_large"),
    (image_bytes((20, 80)), ImageOptions(min_side=32), "too_small"),
    (image_bytes((100, 20)), ImageOptions(max_aspect=4.0), "bad_aspect"),
])
def test_rejections_name_their_reason(data, options, reason):
    with pytest.raises(SampleRejected) as rejected:
        prepare_image(data, options)
    assert rejected.value.reason == reason


@pytest.mark.parametrize("resize", [None, 20])
def test_exif_orientation_is_applied_so_pixels_are_upright(resize):
    # Stored 40x20, left half red, right half blue; orientation 6 means "turn 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    prepared = prepare_image(buffer.getvalue(), ImageOptions(resize=resize))
    upright = Image.open(io.BytesIO(prepared.jpeg))
    side = resize or 20
    assert upright.size == (side, 2 * side) and (prepared.original_width, prepared.original_height) == (20, 40)
    top, bottom = upright.getpixel((side // 2, side // 4)), upright.getpixel((side // 2, 2 * side - side // 4))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top after the turn


@pytest.mark.parametrize("name", ["shapes", "forms", "characters", "digits"])
def test_every_synthetic_corpus_draws_labelled_captioned_images(name, tmp_path):
    """Each generator gives images of the asked size, a caption from its templates naming the label's
    class, and the same images for the same seed; the zero-shot files list its classes and templates."""
    import random

    from mmscale.shards.synthetic import corpus, write_zeroshot_files

    chosen = corpus(name)
    drawn = [chosen.draw(random.Random(seed), 48, "plain") for seed in range(12)]
    for image, caption, label in drawn:
        assert image.size == (48, 48) and 0 <= label < len(chosen.classnames)
        assert any(template.format(chosen.classnames[label]) == caption for template in chosen.templates)
    again = chosen.draw(random.Random(0), 48, "plain")
    assert again[0].tobytes() == drawn[0][0].tobytes() and again[1:] == drawn[0][1:]
    classnames, templates = write_zeroshot_files(tmp_path, name)
    assert classnames.read_text().split("\n")[:-1] == list(chosen.classnames)
    assert templates.read_text().split("\n")[:-1] == list(chosen.templates)


def test_an_unknown_corpus_is_named_with_the_choices():
    from mmscale.shards.synthetic import corpus

    with pytest.raises(ValueError, match="choose one of shapes, forms, characters, digits"):
        corpus("letters")
