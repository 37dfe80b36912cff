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
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from encoder_service.config import EncoderConfig
from encoder_service.errors import InvalidMedia, MediaForbidden
from encoder_service.fetcher import HttpFetcher
from encoder_service.handles import HandleStore
from encoder_service.local_files import LocalFiles
from encoder_service.stages import stage
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
        self._local_files = (LocalFiles(config.allowed_local_media_path)
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
        source, digest = await self.load_image_source(ref, tenant)
        if isinstance(source, Image.Image):
            assert digest is not None  # only a handle's media comes back decoded
            return source, digest
        image = await self.decode(source)
        return image, await self.remember_image(source, image, tenant)

    async def decode(self, data: bytes) -> Image.Image:
        """Image file bytes (from load_image_source) -> the decoded RGB image."""
        with stage("decode"):
            return await asyncio.to_thread(decode_image, data, self._config.max_image_pixels)

    async def remember_image(self, data: bytes, image: Image.Image, tenant: str) -> str:
        """Keeps a decoded upload behind its handle for `tenant`; returns the handle's digest."""
        return await self._handles.remember(tenant, Modality.IMAGE, data, image)

    async def load_image_source(self, ref: MediaRef,
                                tenant: str = "") -> tuple[Image.Image | bytes, str | None]:
        """The image file bytes for `ref`, size-checked but not decoded (digest None); or,
        behind an `mm://` handle, the decoded image and the handle's digest."""
        if ref.mime_type and not ref.mime_type.lower().startswith("image/"):
            raise InvalidMedia(f"mime_type {ref.mime_type!r} is not an image type; this encoder "
                               f"accepts images (image/png, image/jpeg, ...)")
        if ref.data and ref.url:
            raise InvalidMedia("a media item must carry either url or data, not both")
        if ref.data:
            return self._check_size(ref.data, "inline media"), None
        if not ref.url:
            raise InvalidMedia("a media item has neither url nor data; set one of them")
        digest = self._handle_digest(ref.url)
        if digest is not None:
            image = await self._handles.recall(tenant, digest, Modality.IMAGE,
                                               self._decode_image)
            assert isinstance(image, Image.Image)  # recall checked the modality
            return image, digest
        with stage("fetch"):
            return await self._read_url(ref.url), None

    def image_size(self, source: Image.Image | bytes) -> tuple[int, int]:
        """(width, height) from the header alone, with every check decode_image makes
        before decoding (format, pixel limit)."""
        if isinstance(source, Image.Image):
            return source.size
        with open_image(source, self._config.max_image_pixels) as image:
            return _oriented_size(image)

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
        if self._local_files is None:
            raise MediaForbidden("file:// URLs are off on this encoder; send the image "
                                 "bytes inline or as a data: URL")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidMedia(f"file:// URL with host {parts.netloc!r}; only local files "
                               f"(file:///path) are supported")
        path = unquote(parts.path)
        data = self._local_files.read(path, self._config.max_media_bytes)
        return self._check_size(data, f"file {PurePosixPath(path).name!r}")


# EXIF orientations that turn the image a quarter: width and height swap.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation is applied, from the header.

    The EXIF block read at open (JPEG, WebP, a PNG's eXIf before its pixels) is parsed
    directly: `getexif()` on a PNG would decode the whole image to look further.
    """
    raw = image.info.get("exif")
    orientation = 1
    if isinstance(raw, bytes):
        exif = Image.Exif()
        try:
            exif.load(raw)
            orientation = exif.get(_ORIENTATION_TAG, 1)
        except (OSError, ValueError, SyntaxError, KeyError, TypeError):
            orientation = 1
    return (image.height, image.width) if orientation in _QUARTER_TURNS else image.size


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


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, checked against the pixel limit."""
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
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes image bytes to RGB, refusing over-limit sizes before any pixel is decoded."""
    image = open_image(data, max_pixels)
    try:
        image.load()
        # Upright as shown to people, as transformers' load_image does for every HF
        # processor (InternVL2's and Qwen-VL's own loaders skip it; see the README).
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidMedia(f"image data is corrupt or truncated ({exc}); send the complete "
                           f"image file") from None
