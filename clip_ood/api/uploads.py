"""Uploaded images: multipart / JSON bodies to bytes, header checks before decoding, decoding (EXIF applied),
the decoders' shared pixel budget. Everything here runs in the decode threads, never on the event loop."""

from __future__ import annotations

import base64
import binascii
import io
import threading
from dataclasses import dataclass

from .errors import ApiError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass
class Upload:
    """One uploaded image: where it came from in the request, and its bytes."""

    index: int
    field: str
    filename: str | None
    data: bytes

    @property
    def name(self) -> str:
        return self.filename or f"{self.field}[{self.index}]"


def open_header(data: bytes, name: str, max_pixels: int):
    """Bytes -> a lazily decoded PIL image (header read only), or 413 / 415 / 400."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: image has too many pixels ({e})", limit=max_pixels) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(415, f"{name}: not a supported image ({', '.join(ALLOWED_FORMATS)})") from e
    w, h = im.size
    if w * h > max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the per-image limit of {max_pixels}",
                       limit=max_pixels, limit_name="max_pixels")
    return im


def decode_opened(im, name: str):
    """Fully decode a header-checked image as RGB in its displayed orientation (EXIF), or 400 / 413."""
    from PIL import Image, ImageOps

    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: image has too many pixels") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ApiError(400, f"{name}: truncated or corrupt image ({e})") from e


def decode_image(data: bytes, name: str, max_pixels: int):
    """Bytes -> RGB PIL image (EXIF applied), or 413 (too many pixels), 415 (not an image), 400 (corrupt)."""
    return decode_opened(open_header(data, name, max_pixels), name)


class PixelBudget:
    """At most ``capacity`` pixels decoded at once across all requests (bounds the decoders' memory)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.capacity)
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def parse_multipart(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    """Multipart body -> uploads of the parts named ``files`` (python-multipart, in memory; 400 / 413)."""
    from python_multipart import parse_form
    from python_multipart.exceptions import FormParserError

    uploads: list[Upload] = []
    other = []

    class _TooMany(Exception):
        pass

    def on_file(f) -> None:
        fname = (f.field_name or b"").decode("utf-8", "replace")
        if fname != "files":
            other.append(fname)
            return
        if len(uploads) >= max_images:
            raise _TooMany
        fo = f.file_object
        fo.seek(0)
        name = f.file_name.decode("utf-8", "replace")[:200] if f.file_name else None
        uploads.append(Upload(len(uploads), "files", name, fo.read()))

    def on_field(f) -> None:
        name = (f.field_name or b"").decode("utf-8", "replace")
        if name == "files":
            raise ApiError(400, f"part 'files' #{len(uploads) + 1} is a text field, not a file")

    headers = {"Content-Type": content_type.encode("latin-1", "replace"), "Content-Length": str(len(body)).encode()}
    try:
        parse_form(headers, io.BytesIO(body), on_field, on_file)
    except _TooMany:
        raise ApiError(413, f"more than {max_images} images in one request; the limit is {max_images}",
                       limit=max_images, limit_name="max_images") from None
    except ApiError:
        raise
    except (FormParserError, ValueError, KeyError, AttributeError) as e:
        raise ApiError(400, f"bad multipart body: {e}") from e
    if not uploads:
        raise ApiError(400, "no image parts: send one or more multipart parts named 'files'")
    return uploads


def parse_json(body: bytes, max_images: int) -> list[Upload]:
    """``{"images": [base64 | {"name", "data"}, ...]}`` -> uploads (400 / 413); URLs and paths are refused."""
    import json

    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e})") from e
    items = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise ApiError(400, "JSON body must be {\"images\": [base64 string | {\"name\", \"data\"}, ...]}")
    if len(items) > max_images:
        raise ApiError(413, f"{len(items)} images in one request; the limit is {max_images}", limit=max_images,
                       limit_name="max_images")
    out = []
    for i, it in enumerate(items):
        fname = None
        if isinstance(it, dict):
            fname = str(it["name"])[:200] if it.get("name") else None
            it = it.get("data")
        name = fname or f"images[{i}]"
        if not isinstance(it, str):
            raise ApiError(400, f"{name}: expected a base64 string")
        s = it.strip()
        if s.lower().startswith(("http://", "https://", "ftp://", "file:", "s3://", "gs://", "/")):
            raise ApiError(400, f"{name}: URLs and paths are not accepted; send the image bytes as base64")
        if s.startswith("data:"):
            s = s.split(",", 1)[1] if "," in s else ""
        try:
            out.append(Upload(i, "images", fname, base64.b64decode(s, validate=True)))
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{name}: invalid base64 ({e})") from e
    return out
