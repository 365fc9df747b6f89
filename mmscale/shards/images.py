"""Image validation, resizing and JPEG encoding for shard writing.

Everything a shard writer needs to turn arbitrary image bytes into the RGB JPEG that goes
into a shard, or into a named reason for skipping them. The pixel count is checked from the
header, before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from mmscale.data.imagefile import open_image, rgb_on_white
from mmscale.data.tars import SampleRejected  # noqa: F401 (re-exported for the writer)

# PIL's own default (Image.MAX_IMAGE_PIXELS): about 0.25 GB of 24-bit pixels.
DEFAULT_MAX_PIXELS = 89_478_485
_KEEP_AS_IS_MODES = ("RGB", "L")
_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_SEARCH_BYTES = 1 << 16  # an APP1 Exif segment sits in the first segments, before the image data


RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")


@dataclass(frozen=True)
class ImageOptions:
    """What the writer does to every image."""

    resize: int | None = None
    """Target size in pixels; None keeps the size (see resize_mode)."""
    resize_mode: str = "keep_ratio"
    """img2dataset's modes: `keep_ratio` shrinks the shorter side to `resize` (never enlarges);
    `center_crop` scales the shorter side to `resize` and crops the middle square; `border` scales
    the longer side to `resize` and pads to a square with black; `no` keeps the size."""
    jpeg_quality: int = 90
    """JPEG quality for images that must be re-encoded."""
    min_side: int | None = None
    """Skip images whose shorter side is below this (reason `too_small`)."""
    max_aspect: float | None = None
    """Skip images whose long/short side ratio exceeds this (reason `bad_aspect`)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Skip images with more pixels than this, read from the header (reason `image_too_large`)."""


@dataclass(frozen=True)
class PreparedImage:
    """A shard-ready JPEG and the sizes before and after resizing."""

    jpeg: bytes
    original_width: int
    original_height: int
    width: int
    height: int


def prepare_image(data: bytes, options: ImageOptions) -> PreparedImage:
    """Validate, filter, resize and JPEG-encode one image.

    JPEG input that needs no resizing and is upright keeps its original bytes (after checking
    that it decodes); everything else becomes an RGB JPEG, turned upright by its EXIF
    orientation, transparent pixels composited on white. Sizes are the upright ones.
    Raises SampleRejected with reason `empty_member`, `not_an_image` (no image signature, e.g. an
    HTML page), `corrupt_image`, `image_too_large`, `too_small` or `bad_aspect`.
    """
    if not data:
        raise SampleRejected("empty_member", "image has no bytes")
    fast = _prepare_plain_jpeg(data, options)
    if fast is not None:
        return fast
    image = open_image(data, max_pixels=options.max_pixels)
    _check_geometry(*image.size, options)  # before the EXIF read: a PNG's getexif() decodes the image
    orientation = _exif_orientation(image)
    turned = orientation in _QUARTER_TURNS
    width, height = image.size[::-1] if turned else image.size  # as a viewer shows it
    layout = _layout(width, height, options)
    if (layout.scaled == layout.canvas == (width, height) and image.format == "JPEG"
            and image.mode in _KEEP_AS_IS_MODES and orientation == 1):
        _load(image)  # within bounds: the original bytes go in, not a re-encoded copy
        return PreparedImage(data, width, height, width, height)
    if image.format == "JPEG" and layout.scaled != (width, height):
        # decode at a reduced DCT scale (1/2, 1/4, 1/8) where that still gives >= the target
        image.draft("RGB", layout.scaled[::-1] if turned else layout.scaled)
    _load(image)
    try:
        if orientation != 1:  # the loader never reads EXIF, so the pixels must be upright
            image = ImageOps.exif_transpose(image)
        image = _fit(rgb_on_white(image), layout)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    except (OSError, ValueError) as error:  # exotic modes PIL cannot turn into RGB JPEG
        raise SampleRejected("corrupt_image", f"cannot convert {image.mode} image ({error})") from None
    return PreparedImage(buffer.getvalue(), width, height, *image.size)


def _prepare_plain_jpeg(data: bytes, options: ImageOptions) -> PreparedImage | None:
    """prepare_image for a JPEG without EXIF in YCbCr or grey, through libjpeg-turbo (simplejpeg): the
    header read without PIL, decoding at a reduced DCT scale where the target is at most half the
    size, encoding with turbo. None for anything else (PIL's path handles it)."""
    if not data.startswith(b"\xff\xd8\xff") or b"Exif\x00\x00" in data[:_EXIF_SEARCH_BYTES]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL's path names the problem
    if colorspace not in ("YCbCr", "Gray"):
        return None
    _check_geometry(width, height, options)
    layout = _layout(width, height, options)
    try:
        if layout.scaled == layout.canvas == (width, height):
            simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True)  # it must decode, all of it
            return PreparedImage(data, width, height, width, height)
        reduced = min(width // layout.scaled[0], height // layout.scaled[1]) >= 2
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                        min_width=layout.scaled[0] if reduced else 0,
                                        min_height=layout.scaled[1] if reduced else 0)
    except ValueError as error:
        raise SampleRejected("corrupt_image", f"image does not decode ({error})") from None
    image = _fit(Image.fromarray(pixels), layout)
    jpeg = simplejpeg.encode_jpeg(np.asarray(image), quality=options.jpeg_quality, colorspace="RGB",
                                  colorsubsampling="420", fastdct=True)
    return PreparedImage(jpeg, width, height, *image.size)


@dataclass(frozen=True)
class _Layout:
    scaled: tuple[int, int]  # the whole image resized to this
    canvas: tuple[int, int]  # then cropped or padded (centred) to this


def _layout(width: int, height: int, options: ImageOptions) -> _Layout:
    size, mode = options.resize, options.resize_mode
    if size is None or mode == "no":
        return _Layout((width, height), (width, height))
    if mode == "keep_ratio":
        scaled = _target_size(width, height, size)
        return _Layout(scaled, scaled)
    scale = size / (min(width, height) if mode == "center_crop" else max(width, height))
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    return _Layout(scaled, (size, size))


def _fit(image: Image.Image, layout: _Layout) -> Image.Image:
    if image.size != layout.scaled:
        # shrinking: PIL's antialiased bilinear (a triangle filter as wide as the scale), the quality
        # class of the area averaging img2dataset uses, at 60% of bicubic's cost; enlarging: bicubic
        shrinking = layout.scaled[0] < image.size[0]
        image = image.resize(layout.scaled, Image.Resampling.BILINEAR if shrinking else Image.Resampling.BICUBIC,
                             reducing_gap=3.0)
    if image.size == layout.canvas:
        return image
    (width, height), (canvas_width, canvas_height) = image.size, layout.canvas
    left, top = (width - canvas_width) // 2, (height - canvas_height) // 2
    if width >= canvas_width and height >= canvas_height:  # center_crop
        return image.crop((left, top, left + canvas_width, top + canvas_height))
    bordered = Image.new("RGB", layout.canvas, (0, 0, 0))  # border
    bordered.paste(image, (-left, -top))
    return bordered


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright), 1 when absent or unreadable."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # broken EXIF must not cost the image
        return 1
    return orientation if orientation in range(1, 9) else 1


def _check_geometry(width: int, height: int, options: ImageOptions) -> None:
    if width <= 0 or height <= 0:
        raise SampleRejected("corrupt_image", f"image size {width}x{height}")
    if width * height > options.max_pixels:
        raise SampleRejected("image_too_large", f"{width}x{height} is over {options.max_pixels} pixels")
    if options.min_side is not None and min(width, height) < options.min_side:
        raise SampleRejected("too_small", f"{width}x{height} has a side under {options.min_side}")
    if options.max_aspect is not None and max(width, height) / min(width, height) > options.max_aspect:
        raise SampleRejected("bad_aspect", f"{width}x{height} is more elongated than {options.max_aspect}")


def _target_size(width: int, height: int, resize: int | None) -> tuple[int, int]:
    """Shorter side to `resize`, aspect kept, never enlarged."""
    shorter = min(width, height)
    if resize is None or shorter <= resize:
        return width, height
    scale = resize / shorter
    if width <= height:
        return resize, max(1, round(height * scale))
    return max(1, round(width * scale)), resize


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise SampleRejected("image_too_large", str(error)) from None
    except Exception as error:
        raise SampleRejected("corrupt_image", f"image does not decode ({error})") from None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode image bytes (as the loader would); SampleRejected for anything unreadable or too large."""
    image = open_image(data, max_pixels=max_pixels)
    _load(image)
    return image
