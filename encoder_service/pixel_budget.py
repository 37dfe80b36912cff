"""A byte budget for decoded pixels in flight, and giving memory back after big items.

An image is decoded to RGB, then tiled into float32 tower input; both live until the tower
has run. Each item reserves what its header says that costs before decoding; when the
budget is spent the item is refused with Overloaded (429 + Retry-After at the gateway)
instead of growing the process without bound. glibc keeps freed large-image memory in
its arenas, so after a big item the budget asks it to return free pages (malloc_trim).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator, Callable

from encoder_service.errors import InvalidMedia, Overloaded

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 64 * 1024 * 1024  # items at least this big give their memory back


def pixel_bytes(width: int, height: int, tiles: int, tile_size: int) -> int:
    """Decoded RGB (plus its RGBA/palette source, as large again at most) and the float32
    tiles of an image."""
    return 2 * 4 * width * height + tiles * 3 * tile_size * tile_size * 4


def _malloc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl)
    if trim is None:
        return None
    return lambda: trim(0)


class PixelBudget:
    """Reserves decoded-pixel bytes per item; `capacity_bytes` 0 turns the budget off."""

    def __init__(self, capacity_bytes: int, trim_after_bytes: int = TRIM_AFTER_BYTES) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._trim_after = trim_after_bytes
        self._trim = _malloc_trim()
        self.trims = 0

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Holds `nbytes` for the block; Overloaded if they are not free now."""
        if self.capacity_bytes:
            if nbytes > self.capacity_bytes:
                raise InvalidMedia(f"the image needs about {nbytes} bytes decoded, more than "
                                   f"this encoder's {self.capacity_bytes}-byte budget; send a "
                                   f"smaller image")
            if self.used_bytes + nbytes > self.capacity_bytes:
                raise Overloaded(f"the encoder is decoding {self.used_bytes} bytes of images "
                                 f"(budget {self.capacity_bytes}); retry shortly")
        self.used_bytes += nbytes
        try:
            yield
        finally:
            self.used_bytes -= nbytes
            if nbytes >= self._trim_after and self._trim is not None:
                await asyncio.to_thread(self._trim)
                self.trims += 1
