"""Turns a media reference into a decoded RGB image (or audio file bytes), enforcing every
media limit.

Sources: inline bytes, `data:` URLs, `file://` under one allow-listed directory,
`http(s)://` (see fetcher.py) and `mm://sha256:<hex>` handles (handles.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from encoder_service.config import EncoderConfig
from encoder_service.errors import InvalidMedia, MediaForbidden, MediaNotFound
from encoder_service.fetcher import HttpFetcher
from encoder_service.handles import HandleStore
from mmserve.wire.media import MediaRef, Modality, parse_handle

# Formats whose decoders are plain pixel codecs; others (EPS runs Ghostscript, ...)
# are not worth the attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FILE_TYPES = {Modality.AUDIO: "audio/wav, audio/mpeg or audio/flac",
               Modality.VIDEO: "video/mp4, video/webm or video/x-matroska"}


class MediaResolver:
    """Resolves and decodes media references under the configured limits. Each load returns
    the media and the digest of its handle (handles.py), recorded for the caller's tenant."""

    def __init__(self, config: EncoderConfig, handles: HandleStore,
                 fetcher: HttpFetcher | None = None) -> None:
        self._config = config
        self._handles = handles
        self._fetcher = fetcher or HttpFetcher(config)
        self._local_root = (Path(config.allowed_local_media_path).resolve()
                            if config.allowed_local_media_path else None)
        # Pillow's bomb limit is process-wide. Ours is checked per image before any
        # pixel is decoded; Pillow's, set to the same value, is the second line (it
        # raises DecompressionBombError from Image.open beyond twice the limit, and
        # only warns below that, for images decode_image refuses anyway).
        Image.MAX_IMAGE_PIXELS = config.max_image_pixels
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    async def load_image(self, ref: MediaRef, tenant: str = "") -> Image.Image:
        """The decoded RGB image for `ref`; raises an EncoderError saying what to change."""
        return (await self.resolve_image(ref, tenant))[0]

    async def load_audio_bytes(self, ref: MediaRef, tenant: str = "") -> bytes:
        """The audio file bytes for `ref` (inline or a data:/file:/http(s) URL), size-checked;
        decoding and the duration limit are audio.py's."""
        return (await self.resolve_file(ref, Modality.AUDIO, tenant))[0]

    async def load_video_bytes(self, ref: MediaRef, tenant: str = "") -> bytes:
        """The video file bytes for `ref`, size-checked; video.py decodes and samples them."""
        return (await self.resolve_file(ref, Modality.VIDEO, tenant))[0]

    async def resolve_image(self, ref: MediaRef, tenant: str = "") -> tuple[Image.Image, str]:
        """The decoded RGB image for `ref` and the digest of its handle."""
        if ref.mime_type and not ref.mime_type.lower().startswith("image/"):
            raise InvalidMedia(f"mime_type {ref.mime_type!r} is not an image type; this encoder "
                               f"accepts images (image/png, image/jpeg, ...)")
        if ref.data and ref.url:
            raise InvalidMedia("a media item must carry either url or data, not both")
        if ref.data:
            data = self._check_size(ref.data, "inline media")
        elif ref.url:
            digest = self._handle_digest(ref.url)
            if digest is not None:
                image = await self._handles.recall(tenant, digest, Modality.IMAGE,
                                                   self._decode_image)
                assert isinstance(image, Image.Image)  # recall checked the modality
                return image, digest
            data = await self._read_url(ref.url)
        else:
            raise InvalidMedia("a media item has neither url nor data; set one of them")
        image = await self._decode_image(data)
        return image, await self._handles.remember(tenant, Modality.IMAGE, data, image)

    async def _decode_image(self, data: bytes) -> Image.Image:
        return await asyncio.to_thread(decode_image, self._check_size(data, "stored media"),
                                       self._config.max_image_pixels)

    async def resolve_file(self, ref: MediaRef, modality: Modality,
                           tenant: str = "") -> tuple[bytes, str]:
        """The bytes of an audio or video file for `ref` and the digest of its handle."""
        kind = modality.label
        if ref.mime_type and not ref.mime_type.lower().startswith(f"{kind}/"):
            raise InvalidMedia(f"mime_type {ref.mime_type!r} is not a {kind}/* type, as a {kind} "
                               f"item needs; use {_FILE_TYPES[modality]}")
        if ref.data and ref.url:
            raise InvalidMedia("a media item must carry either url or data, not both")
        if ref.data:
            data = self._check_size(ref.data, f"inline {kind}")
        elif not ref.url:
            raise InvalidMedia("a media item has neither url nor data; set one of them")
        else:
            digest = self._handle_digest(ref.url)
            if digest is not None:
                stored = await self._handles.recall(tenant, digest, modality, self._as_file)
                assert isinstance(stored, bytes)  # recall checked the modality
                return stored, digest
            data = await self._read_url(ref.url, kind=kind)
        return data, await self._handles.remember(tenant, modality, data, data)

    async def _as_file(self, data: bytes) -> bytes:
        return self._check_size(data, "stored media")

    @staticmethod
    def _handle_digest(url: str) -> str | None:
        """The digest of an `mm://sha256:` handle, checked for length and form before any
        lookup; None for other URLs."""
        if not url.startswith("mm:"):
            return None
        digest = parse_handle(url)
        if digest is None:
            raise InvalidMedia(f"malformed media handle {url[:90]!r}; expected "
                               f"mm://sha256:<64 lowercase hex digits>, as the server issued it")
        return digest

    async def _read_url(self, url: str, kind: str = "image") -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._check_size(parse_data_url(url, self._config.max_media_bytes, kind),
                                    "data: URL")
        if scheme == "file":
            return await asyncio.to_thread(self._read_file, url)
        if scheme in ("http", "https"):
            return self._check_size(await self._fetcher.fetch(url), "downloaded media")
        raise InvalidMedia(f"unsupported URL scheme {scheme!r}; use http(s)://, data:, file:// "
                           f"or mm://sha256:<hex>")

    def _check_size(self, data: bytes, what: str) -> bytes:
        if len(data) > self._config.max_media_bytes:
            raise InvalidMedia(f"{what} is {len(data)} bytes; the limit is "
                               f"{self._config.max_media_bytes} bytes; send a smaller image")
        return data

    def _read_file(self, url: str) -> bytes:
        if self._local_root is None:
            raise MediaForbidden("file:// URLs are off on this encoder; send the image "
                                 "bytes inline or as a data: URL")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidMedia(f"file:// URL with host {parts.netloc!r}; only local files "
                               f"(file:///path) are supported")
        # resolve() removes `..` and follows symlinks, so the containment check below
        # sees where the file really is.
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(self._local_root):
            raise MediaForbidden(f"file:// URLs must point inside {self._local_root}; "
                                 f"{unquote(parts.path)!r} is outside it")
        if not path.is_file():
            raise MediaNotFound(f"no such file: {unquote(parts.path)!r}")
        with path.open("rb") as handle:
            data = handle.read(self._config.max_media_bytes + 1)
        return self._check_size(data, f"file {path.name!r}")


def parse_data_url(url: str, max_bytes: int, kind: str = "image") -> bytes:
    """The payload of a `data:<kind>/...;base64,...` URL (kind: image, audio, video), strictly
    decoded."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise InvalidMedia("malformed data: URL: no ',' separates the header from the data; "
                           "expected data:image/png;base64,<base64>")
    mime, *params = header.split(";")
    if not mime.lower().startswith(f"{kind}/"):
        example = {"image": "data:image/png;base64,...", "audio": "data:audio/wav;base64,...",
                   "video": "data:video/mp4;base64,..."}[kind]
        raise InvalidMedia(f"data: URL has type {mime or 'text/plain'!r}; {kind} items need "
                           f"type {kind}/*, e.g. {example}")
    if "base64" not in (p.strip().lower() for p in params):
        raise InvalidMedia("data: URL must be base64-encoded: data:image/png;base64,<base64>")
    # Refuse an oversized payload before spending time and memory decoding it.
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise InvalidMedia(f"data: URL payload decodes to about {len(payload) // 4 * 3} bytes; "
                           f"the limit is {max_bytes} bytes; send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMedia(f"data: URL is not valid base64 ({exc}); encode the image with "
                           f"standard base64, without whitespace or line breaks") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes image bytes to RGB, refusing over-limit sizes before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InvalidMedia(f"image is too large to decode ({exc}); the limit is {max_pixels} "
                           f"pixels; send a smaller image") from None
    except UnidentifiedImageError:
        raise InvalidMedia(f"media is not a supported image (expected one of "
                           f"{', '.join(IMAGE_FORMATS)}); check that the bytes are an "
                           f"image file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidMedia(f"image header is corrupt ({exc}); send a valid image file") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise InvalidMedia(f"image is {image.width}x{image.height} = {pixels} pixels; the limit "
                           f"is {max_pixels} pixels; send a smaller image")
    if pixels == 0:
        raise InvalidMedia("image has zero width or height")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidMedia(f"image data is corrupt or truncated ({exc}); send the complete "
                           f"image file") from None
