"""file:// reads confined to the allowed directory by the open itself (issue 13, gap 5)."""

from __future__ import annotations

import os
import threading

import pytest

from encoder_service.errors import InvalidMedia, MediaForbidden, MediaNotFound
from encoder_service.local_files import LocalFiles

INSIDE, OUTSIDE = b"inside-bytes", b"SECRET-bytes"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.bin").write_bytes(INSIDE)
    (tmp_path / "secret.bin").write_bytes(OUTSIDE)
    return root


@pytest.fixture(params=["openat2", "per-component"])
def files(request, tree) -> LocalFiles:
    return LocalFiles(str(tree), use_openat2=request.param == "openat2")


def test_a_file_inside_is_read(files, tree):
    assert files.read(f"{tree}/sub/a.bin", 100) == INSIDE
    assert files.read(f"{tree}/sub/a.bin", 3) == INSIDE[:4]  # the caller sees it is too big


@pytest.mark.parametrize("path", ["{root}/../secret.bin", "{root}/sub/../../secret.bin",
                                  "{root}/out.bin", "{root}/outdir/secret.bin", "/etc/passwd",
                                  "{root}"])
def test_nothing_outside_is_reached(files, tree, path):
    (tree / "out.bin").symlink_to(tree.parent / "secret.bin")
    (tree / "outdir").symlink_to(tree.parent)
    with pytest.raises(MediaForbidden) as info:
        files.read(path.format(root=tree), 100)
    assert str(tree) not in str(info.value)


def test_nul_in_a_path_is_a_bad_request(files, tree):
    with pytest.raises(InvalidMedia, match="NUL"):
        files.read(f"{tree}/sub/a.bin\0.png", 100)


def test_missing_files_and_directories_are_not_found(files, tree):
    with pytest.raises(MediaNotFound, match="no such file"):
        files.read(f"{tree}/sub/none.bin", 100)
    with pytest.raises(MediaNotFound):
        files.read(f"{tree}/sub", 100)
    os.mkfifo(tree / "fifo")
    with pytest.raises(MediaNotFound, match="not a regular file"):
        files.read(f"{tree}/fifo", 100)  # and it did not block


def test_a_symlink_swapped_in_during_reads_never_escapes(files, tree):
    """One thread keeps replacing `x.bin` (atomically) by a file inside and a symlink to
    a file outside; every read gets the inside bytes or a refusal, never the outside ones."""
    target, staging = tree / "x.bin", tree / "staging"
    target.write_bytes(INSIDE)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            staging.unlink(missing_ok=True)
            staging.symlink_to(tree.parent / "secret.bin")
            os.replace(staging, target)
            staging.write_bytes(INSIDE)
            os.replace(staging, target)

    swapper = threading.Thread(target=swap)
    swapper.start()
    seen: list[bytes | str] = []
    try:
        for _ in range(2000):
            try:
                seen.append(files.read(f"{tree}/x.bin", 100))
            except (MediaForbidden, MediaNotFound) as exc:
                seen.append(type(exc).__name__)
    finally:
        stop.set()
        swapper.join()
    assert OUTSIDE not in seen
    assert INSIDE in seen and "MediaForbidden" in seen  # both states were hit
