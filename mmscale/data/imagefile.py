"""Opening untrusted image bytes: only the formats shards hold, the size refused before decoding.

Both sides of the system decode images that came from elsewhere: the shard writer's downloads
and the loader's, `inspect_shards`' and `mmscale embed`'s reads of shards and files that others
wrote. PIL on its own tries every plugin it has on such bytes; some do more than decode (an EPS
body, even one stored as `.png`, runs Ghostscript where it is installed), so images are opened
with an explicit list of formats. PIL's decompression-bomb limit is set for the open so that an
image over `max_pixels` raises from its header, and the size is checked again before anything
that could decode (a PNG's `getexif()`, say) runs.
"""

from __future__ import annotations

import io
import threading
import warnings

from PIL import Image

from mmscale.data.tars import SampleRejected

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The PIL formats mmscale opens; anything else is `not_an_image`."""
# Leading bytes of JPEG, PNG, GIF, WebP/RIFF, BMP, TIFF: bytes that start so but do not open are a
# corrupt image; anything else (an HTML error page, an EPS file) is not an image we read at all.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

_OPEN_LOCK = threading.Lock()


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """`data` opened by PIL with only its header read, or SampleRejected: `image_too_large` (more than
    `max_pixels`), `not_an_image` (no allowed format's signature) or `corrupt_image`.

    PIL's pixel limit is process-wide, so threads take turns setting and restoring it; its check raises
    above twice the limit, hence half of `max_pixels`.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max(1, max_pixels // 2)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as error:
            raise SampleRejected("image_too_large", str(error)) from None
        except Exception as error:  # PIL raises many types for bad data
            if data.startswith(IMAGE_SIGNATURES):
                raise SampleRejected("corrupt_image", f"cannot identify image ({error})") from None
            raise SampleRejected("not_an_image", f"not a {', '.join(IMAGE_FORMATS)} image") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise SampleRejected("image_too_large", f"{width}x{height} is over {max_pixels} pixels")
    return image


def rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (what viewers show, and what we store)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
