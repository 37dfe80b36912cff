"""Small encoded images for the encoder tests."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_bytes(width: int = 64, height: int = 48, color=(200, 30, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"
