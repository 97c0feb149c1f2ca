"""Images and requests for the serving tests: good images in every accepted mode and format,
and the bad-input corpus with the status each case must get (README "Serving").

The corpus assumes the endpoint's test limits: ``max_body_bytes = BODY_LIMIT``,
``max_pixels = PIXEL_LIMIT``, ``min_side = MIN_SIDE``.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BODY_LIMIT = 2 << 20  # bytes
PIXEL_LIMIT = 4_000_000  # width x height
MIN_SIDE = 8


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def noise_png(height: int = 48, width: int = 64, seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise_rgb(height, width, seed)), "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(noise_png(1, 1))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(header) & 0xFFFFFFFF)
    return bytes(data)


def gradient_rgb(height: int, width: int) -> np.ndarray:
    """A smooth image: compresses to a small PNG whatever its size."""
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    red = np.broadcast_to(rows, (height, width))
    green = np.broadcast_to(cols, (height, width))
    blue = (red + green) / 2
    return np.stack([red, green, blue], axis=2).astype(np.uint8)


def multipart(field_name: str, data: bytes, filename: str | None, content_type: str) -> tuple:
    """``(body, content_type)`` of a multipart/form-data body with one part."""
    boundary = "segplatformtestboundary"
    disposition = f'form-data; name="{field_name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
    if filename is not None:
        head += f"Content-Type: {content_type}\r\n"
    body = head.encode() + b"\r\n" + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Case:
    """One request: raw ``body`` (or a chunk generator without Content-Length) and the
    expected status and error code."""

    name: str
    body: bytes | Callable[[], Iterator[bytes]]
    content_type: str | None
    status: int
    code: str | None = None  # error code expected (None for 200)
    query: dict[str, str] = field(default_factory=lambda: {"format": "png"})


def good_images() -> dict[str, tuple[bytes, str]]:
    """Accepted images in each mode and format: name -> (bytes, content type)."""
    rgb = noise_rgb(40, 56, seed=3)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    return {
        "rgb_png": (encode(Image.fromarray(rgb), "PNG"), "image/png"),
        "grey_png": (encode(Image.fromarray(rgb[:, :, 0]), "PNG"), "image/png"),
        "rgba_png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "image/png"),
        "palette_png": (encode(Image.fromarray(rgb).convert("P"), "PNG"), "image/png"),
        "la_png": (encode(Image.fromarray(rgb).convert("LA"), "PNG"), "image/png"),
        "cmyk_jpeg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "image/jpeg"),
        "rgb_jpeg": (encode(Image.fromarray(rgb), "JPEG", quality=90), "image/jpeg"),
        "webp": (encode(Image.fromarray(rgb), "WEBP", lossless=True), "image/webp"),
        "tiff": (encode(Image.fromarray(rgb), "TIFF"), "image/tiff"),
        "octet_stream_png": (encode(Image.fromarray(rgb), "PNG"), "application/octet-stream"),
    }


def bad_input_corpus() -> list[Case]:
    """At least 20 requests the endpoint must answer with a documented status, never 5xx."""
    png = noise_png(48, 64)
    jpeg = encode(Image.fromarray(noise_rgb(64, 64, seed=1)), "JPEG", quality=90)
    frames = [Image.fromarray(noise_rgb(32, 32, seed=s)).convert("P") for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    tiff = io.BytesIO()
    pages = [Image.fromarray(noise_rgb(32, 32, seed=s)) for s in range(2)]
    pages[0].save(tiff, format="TIFF", save_all=True, append_images=pages[1:])
    over = b"\x89PNG" + bytes(BODY_LIMIT + 1024)

    def chunked_over() -> Iterator[bytes]:
        chunk = bytes(256 << 10)
        for _ in range(BODY_LIMIT // len(chunk) + 4):
            yield chunk

    sixteen = encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG")
    tiny = encode(Image.fromarray(noise_rgb(1, 1)), "PNG")
    too_small = encode(Image.fromarray(noise_rgb(MIN_SIDE - 1, 40)), "PNG")
    empty_part = multipart("file", b"", "empty.png", "image/png")
    wrong_field = multipart("image", png, "scan.png", "image/png")
    text_field = multipart("file", b"not a file", None, "text/plain")
    lying = multipart("file", png, "scan.jpg", "image/jpeg")
    text_part = multipart("file", b"hello", "notes.txt", "text/plain")
    huge_legal = encode(Image.fromarray(gradient_rgb(1990, 2000)), "PNG")
    assert len(huge_legal) < BODY_LIMIT and PIXEL_LIMIT >= 1990 * 2000
    cases = [
        Case("empty body", b"", "image/png", 400, "empty_body"),
        Case(
            "random bytes",
            bytes(np.random.default_rng(5).bytes(4096)),
            "image/png",
            400,
            "bad_image",
        ),
        Case(
            "random bytes as octet-stream",
            b"\x00\x01garbage" * 50,
            "application/octet-stream",
            400,
            "bad_image",
        ),
        Case("truncated PNG", png[: len(png) // 2], "image/png", 400, "bad_image"),
        Case("truncated JPEG", jpeg[: len(jpeg) // 2], "image/jpeg", 400, "bad_image"),
        Case("1x1 image", tiny, "image/png", 422, "image_not_accepted"),
        Case("image below the smallest side", too_small, "image/png", 422, "image_not_accepted"),
        Case("empty multipart field", empty_part[0], empty_part[1], 400, "empty_body"),
        Case("wrong multipart field name", wrong_field[0], wrong_field[1], 400, "bad_multipart"),
        Case(
            "multipart text field instead of a file",
            text_field[0],
            text_field[1],
            400,
            "bad_multipart",
        ),
        Case(
            "multipart part of type text/plain",
            text_part[0],
            text_part[1],
            415,
            "unsupported_media_type",
        ),
        Case(
            "broken multipart body",
            b"--x\r\nnot multipart",
            "multipart/form-data; boundary=x",
            400,
            "bad_multipart",
        ),
        Case(
            "decompression bomb (Pillow's limit)",
            png_claiming(30000, 30000),
            "image/png",
            413,
            "too_many_pixels",
        ),
        Case(
            "decompression bomb (our limit)",
            png_claiming(5000, 5000),
            "image/png",
            413,
            "too_many_pixels",
        ),
        Case("body over the limit with Content-Length", over, "image/png", 413, "body_too_large"),
        Case(
            "body over the limit without Content-Length",
            chunked_over,
            "image/png",
            413,
            "body_too_large",
        ),
        Case("16-bit PNG", sixteen, "image/png", 422, "image_not_accepted"),
        Case("animated GIF", gif.getvalue(), "image/gif", 415, "unsupported_media_type"),
        Case(
            "animated GIF as octet-stream",
            gif.getvalue(),
            "application/octet-stream",
            415,
            "unsupported_media_type",
        ),
        Case("multi-page TIFF", tiff.getvalue(), "image/tiff", 422, "image_not_accepted"),
        Case("text/plain", b"a picture of a cat", "text/plain", 415, "unsupported_media_type"),
        Case(
            "application/json",
            b'{"image": "cat.png"}',
            "application/json",
            415,
            "unsupported_media_type",
        ),
        Case("unknown format=", png, "image/png", 400, "bad_parameter", {"format": "gif"}),
        Case("bad flip=", png, "image/png", 400, "bad_parameter", {"flip": "maybe"}),
        Case("scales out of range", png, "image/png", 400, "bad_parameter", {"scales": "0.1,9"}),
        # Accepted despite looking odd: documented 200s.
        Case("PNG with a lying extension and type", lying[0], lying[1], 200),
        Case("CMYK JPEG", good_images()["cmyk_jpeg"][0], "image/jpeg", 200),
        Case("RGBA PNG", good_images()["rgba_png"][0], "image/png", 200),
        Case("palette PNG", good_images()["palette_png"][0], "image/png", 200),
        Case("huge but legal image", huge_legal, "image/png", 200),
    ]
    return cases
