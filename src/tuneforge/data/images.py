"""Images in datasets: where an image reference may point, how it is checked, and how it is loaded.

A reference is a `data:` URL (base64) or, in a file the user reads from their own disk (the CLI), a path
relative to the dataset file that stays inside its folder. http(s) URLs are refused: nothing is fetched.
An uploaded file (read with InputLimits) may hold data: URLs only, so no request makes the server open a
path it names. Every image is decoded with Pillow and checked: format (png, jpeg, webp, gif: its first
frame), bytes, pixels, and how many one example holds, each problem a DataProblem with its line and field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.problems import DataProblem, short_repr

# Pillow's format names -> ours (MPO: a camera's JPEG with a second picture, which Pillow names on its own).
ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif"}
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<base64>;base64)?,",
                      re.IGNORECASE)
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageLimits:
    """What one image, and one example's images, may be. OpenAI's vision fine-tuning takes up to 10 MB and
    64 images per example; the pixel cap keeps a decompression bomb from being decoded at all."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_images_per_example: int = 64


DEFAULT_LIMITS = ImageLimits()


class ImageError(ValueError):
    """An image reference that cannot be used: `kind` is the DataProblem kind, the message what was found."""

    def __init__(self, kind: str, expected: str, found: str):
        super().__init__(f"expected {expected}, found {found}")
        self.kind, self.expected, self.found = kind, expected, found


@dataclass(frozen=True)
class ImageInfo:
    format: str  # png, jpeg, webp, gif
    width: int
    height: int
    bytes: int


def image_bytes(reference: str, *, base_dir: Path | None, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes a reference names: a data: URL's payload, or a file inside base_dir (None: paths
    are refused, as in uploads). Raises ImageError."""
    if not isinstance(reference, str) or not reference.strip():
        raise ImageError("wrong_type", "an image URL (a data: URL or a path) as a string", short_repr(reference))
    if reference[:5].lower() == "data:":
        return _data_url_bytes(reference, limits)
    if URL_SCHEME.match(reference):
        scheme = reference.split(":", 1)[0].lower()
        raise ImageError("image_url_refused", "a data: URL (base64) or an uploaded file: images are never fetched "
                         "from the network", f"an {scheme} URL {short_repr(reference, 40)}")
    if base_dir is None:
        raise ImageError("image_path_refused", "a data: URL (base64): an uploaded dataset cannot name files on the "
                         "server", f"the path {short_repr(reference, 40)}")
    path = Path(reference)
    if path.is_absolute() or ".." in path.parts:
        raise ImageError("image_path_outside", "a path relative to the dataset file, inside its folder",
                         short_repr(reference, 60))
    root = base_dir.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):  # a symbolic link out of the folder
        raise ImageError("image_path_outside", "a path relative to the dataset file, inside its folder",
                         f"{short_repr(reference, 40)} (a link out of it)")
    if not resolved.is_file():
        raise ImageError("image_not_found", f"an image file in {root}", f"no file {short_repr(reference, 60)}")
    size = resolved.stat().st_size
    if size > limits.max_bytes:
        raise ImageError("image_too_large", f"at most {limits.max_bytes:,} bytes", f"{size:,} bytes")
    return resolved.read_bytes()


def _data_url_bytes(reference: str, limits: ImageLimits) -> bytes:
    match = DATA_URL.match(reference)
    if match is None or not match.group("base64"):
        raise ImageError("bad_data_url", "a base64 data URL (data:image/png;base64,...)", short_repr(reference, 40))
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError("image_format", "an image/* data URL", f"{mime}")
    payload = reference[match.end():]
    size = len(payload) * 3 // 4
    if size > limits.max_bytes + 2:  # refuse before decoding megabytes of base64
        raise ImageError("image_too_large", f"at most {limits.max_bytes:,} bytes", f"about {size:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("bad_data_url", "valid base64 after the comma", "characters that are not base64") from None


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS):
    """(an RGB PIL image, its ImageInfo): decoded whole (a GIF's first frame), or ImageError."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError("image_too_large", f"at most {limits.max_bytes:,} bytes", f"{len(data):,} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own guard, past twice its MAX_IMAGE_PIXELS
        raise ImageError("image_too_many_pixels", f"at most {limits.max_pixels:,} pixels",
                         "a decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError("image_undecodable", "an image Pillow can decode (png, jpeg, webp, gif)",
                         f"{len(data):,} bytes that are not one") from None
    fmt = ALLOWED_FORMATS.get(image.format or "")
    if fmt is None:
        allowed = ", ".join(dict.fromkeys(ALLOWED_FORMATS.values()))
        raise ImageError("image_format", f"one of {allowed}", str(image.format).lower())
    width, height = image.size
    if width * height > limits.max_pixels:  # checked from the header, before decoding the pixels
        raise ImageError("image_too_many_pixels", f"at most {limits.max_pixels:,} pixels",
                         f"{width} x {height} = {width * height:,}")
    if width == 0 or height == 0:
        raise ImageError("image_undecodable", "an image with pixels", f"{width} x {height}")
    try:
        image.seek(0)  # a GIF: its first frame
        image.load()
        rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageError("image_undecodable", "an image that decodes whole", f"a truncated or corrupt {fmt}") from None
    return rgb, ImageInfo(fmt, width, height, len(data))


def load_image(reference: str, *, base_dir: Path | None, limits: ImageLimits = DEFAULT_LIMITS):
    """The RGB PIL image a (validated) reference names."""
    return decode_image(image_bytes(reference, base_dir=base_dir, limits=limits), limits)[0]


def image_references(record: dict[str, Any], fmt: str) -> list[tuple[str, str]]:
    """(field path, reference) of every image in a normalized image_chat or image_text record."""
    if fmt == "image_text":
        return [("image", record["image"])]
    return [(f"messages[{i}].content[{j}].image_url.url", part["image"])
            for i, message in enumerate(record["messages"]) for j, part in enumerate(message["content"])
            if part["type"] == "image"]


def image_problems(record: dict[str, Any], fmt: str, *, file: str, line: int, base_dir: Path | None,
                   limits: ImageLimits = DEFAULT_LIMITS) -> list[DataProblem]:
    """Every problem of a normalized record's images: references, decoding, format, size, count."""
    problems = []
    references = image_references(record, fmt)
    if len(references) > limits.max_images_per_example:
        problems.append(DataProblem(file, line, "too_many_images", "messages",
                                    f"at most {limits.max_images_per_example} images per example",
                                    f"{len(references)} images"))
    for field, reference in references:
        try:
            decode_image(image_bytes(reference, base_dir=base_dir, limits=limits), limits)
        except ImageError as exc:
            problems.append(DataProblem(file, line, exc.kind, field, exc.expected, exc.found))
    return problems


def png_data_url(image) -> str:
    """A PIL image as a base64 PNG data: URL (what an uploaded dataset carries)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
