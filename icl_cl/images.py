"""Image inputs: one value type for an image, however it was given (a file path, a URL, bytes or a
PIL image), checked on entry so a bad image is refused with the item named and nothing changed.

An image travels through the library as its encoded bytes (PNG, JPEG, ...). Its ``key``, built
from a digest of those bytes, stands in for it wherever inputs are keyed by a string (the
embedding cache, the call cache, the store's example rows).
"""

from __future__ import annotations

import base64
import hashlib
import io
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icl_cl.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# Formats every engine in use decodes; others are refused on entry rather than failing later.
SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
KEY_PREFIX = "image:sha256:"
# Largest image accepted, in bytes and in pixels (decompression bombs).
MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 64 * 1024 * 1024
URL_TIMEOUT_S = 30.0


def _pil() -> Any:
    try:
        from PIL import Image as pil  # noqa: N813 - the module, not our Image
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataError("images need Pillow: pip install 'icl-cl[image]'") from exc
    return pil


@dataclass(frozen=True, eq=False)
class Image:
    """An image input: its encoded bytes, checked to decode.

    Build one with :func:`load_image` (or :meth:`from_bytes`), never directly.

    Attributes:
        data: The encoded image file.
        format: ``PNG``, ``JPEG``, ``GIF``, ``WEBP`` or ``BMP``.
        size: ``(width, height)`` in pixels.
        source: Where it came from (a path, a URL, ``<bytes>``, ``<PIL image>``), for messages.
        key: ``image:sha256:<hex>``; equal bytes give equal keys.
    """

    data: bytes = field(repr=False)
    format: str
    size: tuple[int, int]
    source: str
    key: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "<bytes>", **where: Any) -> Image:
        """Check that ``data`` is one whole image in a supported format; ``origin`` says where it
        came from, ``where`` (``source``, ``line``, ``item``) where it was named."""
        if not data:
            raise DataError(f"{origin}: is empty", field="image", **where)
        if len(data) > MAX_BYTES:
            raise DataError(
                f"{origin}: is {len(data)} bytes; the limit is {MAX_BYTES}", field="image", **where
            )
        pil = _pil()
        try:
            with pil.open(io.BytesIO(data)) as img:
                fmt = (img.format or "").upper()
                size = (int(img.width), int(img.height))
                if fmt not in SUPPORTED_FORMATS:
                    raise DataError(
                        f"{origin}: unsupported image format {fmt or 'unknown'} "
                        f"(supported: {', '.join(SUPPORTED_FORMATS)})",
                        field="image",
                        **where,
                    )
                if size[0] * size[1] > MAX_PIXELS:
                    raise DataError(
                        f"{origin}: {size[0]}x{size[1]} pixels; the limit is {MAX_PIXELS}",
                        field="image",
                        **where,
                    )
                img.load()  # decodes every pixel: a truncated or corrupt file fails here
        except DataError:
            raise
        except pil.UnidentifiedImageError as exc:
            raise DataError(
                f"{origin}: not an image, or a format Pillow cannot read", field="image", **where
            ) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(
                f"{origin}: corrupt or truncated image ({exc})", field="image", **where
            ) from exc
        digest = hashlib.sha256(data).hexdigest()
        return cls(data, fmt, size, origin, KEY_PREFIX + digest)

    def pil(self) -> PILImage:
        """The decoded image in RGB (what vision encoders take)."""
        pil = _pil()
        with pil.open(io.BytesIO(self.data)) as img:
            return img.convert("RGB")

    @property
    def mime(self) -> str:
        return f"image/{self.format.lower()}"

    def data_url(self) -> str:
        """``data:image/...;base64,...``: how OpenAI-compatible chat servers take an image."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def is_image_key(item: object) -> bool:
    return isinstance(item, str) and item.startswith(KEY_PREFIX)


def _read_url(url: str, **where: Any) -> bytes:
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise DataError("data URL images must be base64-encoded", field="image", **where)
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise DataError(f"data URL: invalid base64 ({exc})", field="image", **where) from exc
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{url}: cannot fetch ({reason})", field="image", **where) from exc
    return bytes(data)


def load_image(value: object, *, base: str | Path | None = None, **where: Any) -> Image:
    """An :class:`Image` from a path (relative to ``base`` when given), an ``http(s)://`` or
    ``data:`` URL, bytes, a PIL image, or an :class:`Image`.

    ``where`` (``source``, ``line``, ``item``) says where the value came from; every error
    names it.
    """
    if isinstance(value, Image):
        return value
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.from_bytes(bytes(value), "<bytes>", **where)
    if isinstance(value, str):
        if not value.strip():
            raise DataError("is empty", field="image", **where)
        if value.startswith(("http://", "https://", "data:")):
            shown = value if not value.startswith("data:") else "<data URL>"
            return Image.from_bytes(_read_url(value, **where), shown, **where)
        path = Path(value)
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise DataError(f"{value}: no such file", field="image", **where) from exc
        except OSError as exc:
            raise DataError(
                f"{value}: cannot read ({exc.strerror})", field="image", **where
            ) from exc
        return Image.from_bytes(data, value, **where)
    pil = _pil()
    if isinstance(value, pil.Image):
        buffer = io.BytesIO()
        mode_ok = value.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
        (value if mode_ok else value.convert("RGB")).save(buffer, format="PNG")
        return Image.from_bytes(buffer.getvalue(), "<PIL image>", **where)
    raise DataError(
        f"must be a path, a URL, bytes or a PIL image, got {type(value).__name__}",
        field="image",
        **where,
    )
