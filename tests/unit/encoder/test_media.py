"""Media resolution and decoding: every source, every limit, every refusal message."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib

import pytest
from PIL import Image

from encoder_service.cache import ContentStore
from encoder_service.config import EncoderConfig
from encoder_service.errors import InvalidMedia, MediaForbidden, MediaNotFound
from encoder_service.handles import HandleStore
from encoder_service.media import MediaResolver
from encoder_service.media_store import MemoryMediaStore
from mmserve.wire.media import MediaRef, Modality, source_hash

from .images import data_url, png_bytes


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and carries no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


def resolver_for(config: EncoderConfig, handles: HandleStore | None = None) -> MediaResolver:
    return MediaResolver(config, handles or memory_handles())


def memory_handles() -> HandleStore:
    return HandleStore(ContentStore(1 << 20), MemoryMediaStore(1 << 20, ttl_s=60), ttl_s=60)


async def test_inline_png_decodes_to_rgb(config):
    image = await resolver_for(config).load_image(MediaRef(data=png_bytes(64, 48)))
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((0, 0)) == (200, 30, 90)


async def test_rgba_images_become_rgb(config):
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(buffer, format="PNG")
    image = await resolver_for(config).load_image(MediaRef(data=buffer.getvalue()))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)


async def test_data_url_decodes(config):
    image = await resolver_for(config).load_image(MediaRef(url=data_url(png_bytes(20, 10))))
    assert image.size == (20, 10)


@pytest.mark.parametrize("url,message", [
    ("data:image/png;base64,%%%", "not valid base64"),
    ("data:image/png;base64,aGVsbG8", "not valid base64"),  # missing padding
    ("data:image/png;base64,aGVs\nbG8=", "not valid base64"),
    ("data:image/png,rawbytes", "must be base64-encoded"),
    ("data:text/plain;base64,aGVsbG8=", "has type 'text/plain'"),
    ("data:;base64,aGVsbG8=", "has type 'text/plain'"),
    ("data:image/png;base64", "no ','"),
])
async def test_bad_data_urls_say_what_to_fix(config, url, message):
    with pytest.raises(InvalidMedia, match=message):
        await resolver_for(config).load_image(MediaRef(url=url))


async def test_non_image_bytes_are_refused_clearly(config):
    with pytest.raises(InvalidMedia, match="not a supported image .*PNG, JPEG"):
        await resolver_for(config).load_image(MediaRef(data=b"%PDF-1.7 not an image"))


async def test_a_non_image_mime_hint_is_refused(config):
    with pytest.raises(InvalidMedia, match="'audio/wav' is not an image type"):
        await resolver_for(config).load_image(MediaRef(data=png_bytes(), mime_type="audio/wav"))


async def test_an_empty_or_doubled_ref_is_refused(config):
    with pytest.raises(InvalidMedia, match="neither url nor data"):
        await resolver_for(config).load_image(MediaRef())
    with pytest.raises(InvalidMedia, match="either url or data, not both"):
        await resolver_for(config).load_image(MediaRef(url="mm://x", data=b"x"))


async def test_unsupported_scheme(config):
    with pytest.raises(InvalidMedia, match="unsupported URL scheme 'ftp'"):
        await resolver_for(config).load_image(MediaRef(url="ftp://example.com/a.png"))


async def test_media_over_the_byte_cap_is_refused(config):
    small = dataclasses.replace(config, max_media_bytes=1000)
    payload = os.urandom(1001)
    with pytest.raises(InvalidMedia, match="inline media is 1001 bytes; the limit is 1000"):
        await resolver_for(small).load_image(MediaRef(data=payload))
    with pytest.raises(InvalidMedia, match="the limit is 1000 bytes"):
        await resolver_for(small).load_image(MediaRef(url=data_url(os.urandom(2000))))


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (7000, 7000)])
async def test_decompression_bombs_are_refused_from_the_header(config, width, height):
    # The file has no pixel data: decoding it would fail differently, so the pixel
    # message proves the size was refused before any decoding. 1e10 pixels is beyond
    # Pillow's own (2x) bomb limit, 49e6 only beyond ours.
    with pytest.raises(InvalidMedia, match="the limit is 40000000 pixels"):
        await resolver_for(config).load_image(MediaRef(data=png_header(width, height)))


async def test_truncated_images_are_refused(config):
    noisy = io.BytesIO()
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(noisy, format="PNG")
    complete = noisy.getvalue()
    assert (await resolver_for(config).load_image(MediaRef(data=complete))).size == (300, 300)
    with pytest.raises(InvalidMedia, match="corrupt or truncated"):
        await resolver_for(config).load_image(MediaRef(data=complete[:-5000]))


@pytest.fixture
def media_dir(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png_bytes(30, 20))
    (tmp_path / "secret.png").write_bytes(png_bytes(5, 5))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    return root


async def test_file_urls_are_off_by_default(config, media_dir):
    with pytest.raises(MediaForbidden, match="file:// URLs are off"):
        await resolver_for(config).load_image(MediaRef(url=f"file://{media_dir}/sub/ok.png"))


async def test_file_urls_inside_the_allowed_directory_work(config, media_dir):
    local = dataclasses.replace(config, allowed_local_media_path=str(media_dir))
    image = await resolver_for(local).load_image(MediaRef(url=f"file://{media_dir}/sub/ok.png"))
    assert image.size == (30, 20)


@pytest.mark.parametrize("path", ["{root}/../secret.png", "{root}/sub/../../secret.png",
                                  "{root}/link.png", "/etc/passwd", "{root}/%2E%2E/secret.png"])
async def test_file_urls_cannot_escape_the_allowed_directory(config, media_dir, path):
    local = dataclasses.replace(config, allowed_local_media_path=str(media_dir))
    url = "file://" + path.format(root=media_dir)
    with pytest.raises(MediaForbidden, match="must name a file inside") as info:
        await resolver_for(local).load_image(MediaRef(url=url))
    assert str(media_dir) not in str(info.value)  # the directory stays private


async def test_missing_local_file_and_remote_host(config, media_dir):
    local = dataclasses.replace(config, allowed_local_media_path=str(media_dir))
    with pytest.raises(MediaNotFound, match="no such file"):
        await resolver_for(local).load_image(MediaRef(url=f"file://{media_dir}/nope.png"))
    with pytest.raises(InvalidMedia, match="only local files"):
        await resolver_for(local).load_image(MediaRef(url=f"file://server{media_dir}/sub/ok.png"))


async def test_media_handles_resolve_from_the_store(config):
    handles = memory_handles()
    resolver = resolver_for(config, handles)
    image, digest = await resolver.resolve_image(MediaRef(data=png_bytes(4, 4)))
    assert digest == source_hash(Modality.IMAGE, png_bytes(4, 4))
    assert await resolver.load_image(MediaRef(url=f"mm://sha256:{digest}")) is image
    with pytest.raises(MediaNotFound, match="unknown media handle .*send the image itself again"):
        await resolver.load_image(MediaRef(url="mm://sha256:" + "cd" * 32))
    with pytest.raises(InvalidMedia, match="malformed media handle"):
        await resolver.load_image(MediaRef(url="mm://sha256:XYZ"))
    with pytest.raises(InvalidMedia, match="malformed media handle"):
        await resolver.load_image(MediaRef(url=f"mm://sha256:{digest}" + "0" * 10_000))


async def test_a_nul_in_a_file_url_is_a_bad_request(config, media_dir):
    local = dataclasses.replace(config, allowed_local_media_path=str(media_dir))
    with pytest.raises(InvalidMedia, match=r"NUL character \(%00\)"):
        await resolver_for(local).load_image(MediaRef(url=f"file://{media_dir}/sub/ok.png%00"))
