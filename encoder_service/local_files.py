"""Reads `file://` media from one allowed directory, race-free.

Checking a path and then opening it lets a symlink swapped in between the two point the
open elsewhere. Here the open itself is confined: `openat2(RESOLVE_BENEATH)` (Linux 5.6+)
has the kernel refuse any step out of the directory, symlinks included (links that stay
inside still work). Where openat2 is missing or filtered (old kernels, some seccomp
profiles), each component is opened with `O_NOFOLLOW` relative to its parent's descriptor,
so no symlink is followed at all. Either way the opened descriptor is checked with fstat.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path, PurePosixPath

from encoder_service.errors import InvalidMedia, MediaForbidden, MediaNotFound

_SYS_OPENAT2 = 437  # the same number on every architecture Linux has added it to
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO cannot block the read
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OUTSIDE = ("file:// URLs must name a file inside the allowed media directory; "
           "this one is outside it")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_libc = _load_libc()


class LocalFiles:
    """Opens files below `root` (an existing directory) without ever leaving it."""

    def __init__(self, root: str, use_openat2: bool = True) -> None:
        self._roots = tuple(dict.fromkeys(
            (PurePosixPath(os.path.abspath(root)), PurePosixPath(Path(root).resolve()))))
        self._root = str(self._roots[-1])
        self._use_openat2 = use_openat2 and _libc is not None and hasattr(_libc, "syscall")

    def read(self, url_path: str, max_bytes: int) -> bytes:
        """Up to `max_bytes + 1` bytes of the file at the absolute `url_path`."""
        if "\0" in url_path:
            raise InvalidMedia("file:// URL contains a NUL character (%00); remove it")
        relative = self._relative(url_path)
        fd = self._open(relative)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MediaNotFound(f"{url_path!r} is not a regular file")
            with open(fd, "rb", closefd=False) as handle:
                return handle.read(max_bytes + 1)
        finally:
            os.close(fd)

    def _relative(self, url_path: str) -> str:
        path = PurePosixPath(url_path)
        for root in self._roots:
            if path.is_relative_to(root) and path != root:
                return str(path.relative_to(root))
        raise MediaForbidden(OUTSIDE)

    def _open(self, relative: str) -> int:
        if self._use_openat2:
            fd = self._openat2(relative)
            if fd is not None:
                return fd
        return self._open_each(relative)

    def _openat2(self, relative: str) -> int | None:
        """The opened file, or None when this kernel (or its seccomp filter) lacks openat2."""
        assert _libc is not None
        how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        root = os.open(self._root, _DIR_FLAGS)
        try:
            fd = _libc.syscall(_SYS_OPENAT2, root, os.fsencode(relative), ctypes.byref(how),
                               ctypes.sizeof(how))
            code = ctypes.get_errno() if fd < 0 else 0
        finally:
            os.close(root)
        if fd >= 0:
            return int(fd)
        if code in (errno.ENOSYS, errno.EPERM):
            self._use_openat2 = False
            return None
        raise self._error(code, relative)

    def _open_each(self, relative: str) -> int:
        """Opens one component at a time below the root, following no symlink."""
        *parents, name = relative.split("/")
        fd = os.open(self._root, _DIR_FLAGS)
        try:
            for part in parents:
                if part in ("", ".", ".."):
                    raise MediaForbidden(OUTSIDE)
                next_fd = self._open_dir(part, fd)
                os.close(fd)
                fd = next_fd
            if name in ("", ".", ".."):
                raise MediaForbidden(OUTSIDE)
            return os.open(name, _OPEN_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            raise self._error(exc.errno or 0, relative) from None
        finally:
            os.close(fd)

    @staticmethod
    def _open_dir(part: str, parent: int) -> int:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except NotADirectoryError:
            # O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR: tell the two apart.
            if stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
            raise

    def _error(self, code: int, relative: str) -> Exception:
        shown = repr(relative)
        if code in (errno.ENOENT, errno.ENOTDIR):
            return MediaNotFound(f"no such file in the allowed media directory: {shown}")
        if code in (errno.EXDEV, errno.ELOOP):
            return MediaForbidden(f"{OUTSIDE} (or reaches it through a symbolic link): {shown}")
        return MediaForbidden(f"cannot open {shown} in the allowed media directory "
                              f"({os.strerror(code)})")
