"""Request input handling of the endpoint: size caps, media types, multipart, image decoding.

Everything here runs before the model and turns a bad request into a ``ClientError`` carrying
the HTTP status and error code of the HTTP API (README "Serving"):

- 413 ``body_too_large``: ``Content-Length`` over the cap (checked before reading anything), or
  a body without a length that grows over it while streamed in (reading stops at the cap);
- 415 ``unsupported_media_type``: a ``Content-Type`` other than ``image/png``, ``image/jpeg``,
  ``image/webp``, ``image/tiff``, ``multipart/form-data`` or ``application/octet-stream``
  (none given counts as the latter), or content whose format is not one of those four;
- 400 ``empty_body`` / ``bad_multipart`` / ``bad_image``: nothing sent, a form without a ``file``
  upload, bytes that are not an image or are truncated;
- 413 ``too_many_pixels``: width x height over the limit, read from the header before any pixel is
  decoded (decompression bombs: a small file claiming huge dimensions);
- 422 ``image_not_accepted``: a decodable image the model cannot take (smaller than the model's
  smallest side, several frames, 16/32-bit samples, a channel count the model cannot use).

The format is detected from the bytes, not from the declared type or a file name (a PNG sent
as ``scan.jpg`` is read as the PNG it is). Modes are converted as the dataset converters do
(``segplatform.data.format``): ``L``/``RGB`` kept, ``1``/``LA`` to ``L``, ``P``/``PA``/``RGBA``/
``RGBX``/``CMYK``/``YCbCr``/``LAB``/``HSV`` to ``RGB``; 16- and 32-bit modes (``I;16``, ``I``,
``F``) are refused, since training images are 8-bit. EXIF orientation is applied.

Pillow facts relied on (Pillow 13, checked here): ``Image.open`` reads only the header; it raises
``DecompressionBombError`` at once beyond 2 x ``MAX_IMAGE_PIXELS``; truncated files fail in
``load()`` unless ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set (it is not).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Declared types accepted as a raw body; the value is the format they name (None: sniff).
RAW_TYPES: dict[str, str | None] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/tiff": "TIFF",
    "application/octet-stream": None,
    "": None,
}
# Formats Pillow may report for content of the accepted types (MPO: JPEG with extra frames).
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "TIFF"})
# Mode conversions (as segplatform.data.format stores images); modes absent here are refused.
MODE_CONVERSION: dict[str, str] = {
    "L": "L",
    "RGB": "RGB",
    "1": "L",
    "LA": "L",
    "P": "RGB",
    "PA": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}
MULTIPART_FIELD = "file"


class ClientError(Exception):
    """A request the endpoint refuses: HTTP ``status``, stable ``code``, readable ``message``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Upload:
    """The image bytes of a request and what the client said about them."""

    data: bytes
    declared_type: str  # media type of the body or of the multipart part ("" if none)
    filename: str | None = None  # multipart file name, if any


def media_type(content_type: str | None) -> str:
    """``"image/png"`` of ``"image/png; charset=x"``; ``""`` when absent."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_length(header: str | None, limit: int) -> None:
    """413 when a declared length exceeds ``limit``; 400 when it is not a number."""
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise ClientError(
            400, "bad_request", f"Content-Length {header!r} is not a number"
        ) from None
    if length > limit:
        raise ClientError(
            413, "body_too_large", f"request body of {length} bytes exceeds the {limit}-byte limit"
        )


async def read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The concatenated ``chunks``; 413 as soon as more than ``limit`` bytes arrived."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            raise ClientError(413, "body_too_large", f"request body exceeds the {limit}-byte limit")
    return bytes(buffer)


def check_declared_type(declared: str) -> None:
    """415 unless ``declared`` is an accepted image type, octet-stream, or absent."""
    if declared not in RAW_TYPES:
        accepted = ", ".join(t for t in RAW_TYPES if t)
        raise ClientError(
            415,
            "unsupported_media_type",
            f"unsupported media type {declared!r}; send {accepted} "
            f"or multipart/form-data with a {MULTIPART_FIELD!r} field",
        )


async def parse_multipart(body: bytes, content_type: str, max_parts: int = 8) -> Upload:
    """The ``file`` part of a ``multipart/form-data`` body already read in full (and capped)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        # Starlette's parser; file parts spool to disk beyond 1 MB, text fields are capped.
        parser = MultiPartParser(
            Headers({"content-type": content_type}),
            stream(),
            max_files=max_parts,
            max_fields=max_parts,
        )
        form = await parser.parse()
    except (MultiPartException, ValueError, KeyError) as error:
        message = getattr(error, "message", str(error))
        raise ClientError(400, "bad_multipart", f"malformed multipart body ({message})") from None
    try:
        values = form.getlist(MULTIPART_FIELD)
        if not values:
            names = ", ".join(sorted(repr(k) for k in set(form.keys()))) or "none"
            raise ClientError(
                400,
                "bad_multipart",
                f"multipart body has no {MULTIPART_FIELD!r} field (fields: {names})",
            )
        if len(values) > 1:
            raise ClientError(
                400, "bad_multipart", f"send one image: {len(values)} {MULTIPART_FIELD!r} fields"
            )
        part = values[0]
        if not isinstance(part, UploadFile):
            raise ClientError(
                400, "bad_multipart", f"field {MULTIPART_FIELD!r} must be a file upload"
            )
        data = await part.read()
        return Upload(data, media_type(part.content_type), part.filename)
    finally:
        await form.close()


def decode_image(
    data: bytes, *, max_pixels: int, min_side: int = 1, in_channels: int = 3
) -> np.ndarray:
    """Decode ``data`` into a uint8 array (H, W) or (H, W, 3) after every check above."""
    if not data:
        raise ClientError(400, "empty_body", "the request carries no image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ClientError(413, "too_many_pixels", _bomb_message(error, max_pixels)) from None
        except UnidentifiedImageError:
            raise ClientError(
                400, "bad_image", "the body is not an image in a format this endpoint reads"
            ) from None
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
            raise ClientError(400, "bad_image", f"unreadable image header ({error})") from None
        with image:
            return _checked_pixels(image, max_pixels, min_side, in_channels)


def _bomb_message(error: Exception, max_pixels: int) -> str:
    return f"image dimensions exceed the {max_pixels}-pixel limit ({error})"


def _checked_pixels(
    image: Image.Image, max_pixels: int, min_side: int, in_channels: int
) -> np.ndarray:
    if image.format not in SUPPORTED_FORMATS:
        raise ClientError(
            415,
            "unsupported_media_type",
            f"{image.format} images are not accepted; send PNG, JPEG, WebP or TIFF",
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ClientError(
            413,
            "too_many_pixels",
            f"image of {width}x{height} = {width * height} pixels exceeds the "
            f"{max_pixels}-pixel limit",
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":  # MPO: a JPEG with a preview frame
        raise ClientError(
            422, "image_not_accepted", f"the image has {frames} frames; send a single image"
        )
    target = MODE_CONVERSION.get(image.mode)
    if target is None:
        raise ClientError(
            422,
            "image_not_accepted",
            f"image mode {image.mode!r} is not accepted (16- and 32-bit samples are not: "
            "send 8-bit grey, RGB or RGBA)",
        )
    try:
        image.load()  # decodes every pixel: truncated files fail here
        oriented = ImageOps.exif_transpose(image)
        converted = oriented if oriented.mode == target else oriented.convert(target)
        array = np.asarray(converted)
    except ClientError:
        raise
    except Exception as error:  # OSError (truncated), SyntaxError, ValueError, EOFError, ...
        raise ClientError(400, "bad_image", f"the image cannot be decoded ({error})") from None
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise ClientError(
            422,
            "image_not_accepted",
            f"image of {width}x{height} is too small: the model needs at least "
            f"{min_side} pixels on each side",
        )
    channels = 1 if array.ndim == 2 else array.shape[2]
    if in_channels not in (1, 3) and channels != in_channels:
        raise ClientError(
            422,
            "image_not_accepted",
            f"the model takes {in_channels}-channel images; this one has {channels}",
        )
    return np.ascontiguousarray(array)
