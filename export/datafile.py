"""Weights files written and copied at the disk's speed, hashed on the way (no second read to hash them).

Why O_DIRECT: on the VMs these tools run on, the page cache path writes a 10 GB file at 0.4-0.6 GB/s and
costs ~1.3 s of kernel CPU per GB, while direct writes of 64 MiB blocks reach 1.6 GB/s with almost no CPU
(benchmarks/export/results.md). Direct I/O needs block-aligned buffers, sizes and offsets: bytes go
through page-aligned 64 MiB blocks that a thread writes while the next one fills; the last block is
padded and the file truncated to its length. Where the filesystem refuses O_DIRECT the same code writes
through the page cache. The price: a file written this way is not left in the page cache, so its next
reader reads it from the disk (a copy reads it with direct I/O too, at ~1.2 GB/s).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path
from types import TracebackType

import numpy as np

BLOCK = 64 << 20  # bytes per direct write or read; a multiple of every logical block size
_ALIGN = 4096
_DIRECT = getattr(os, "O_DIRECT", 0)
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


class HashedWriter:
    """`write(bytes)` appends to `path` and to a sha256; `close()` returns the hex digest.

    Bytes are staged in `blocks` page-aligned buffers; a thread writes full ones while the caller fills
    the next. `take()` and `commit()` let a caller fill a block itself (a copy reads into it directly).
    """

    def __init__(self, path: Path, direct: bool = True, blocks: int = 2) -> None:
        self.path = path
        self.size = 0
        self._digest = hashlib.sha256()
        self._fd, self._direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct)
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(blocks):
            self._free.put(mmap.mmap(-1, BLOCK))
        self._full: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._current: mmap.mmap | None = None
        self._fill = 0
        self._ended = False  # a block shorter than BLOCK was committed: it was the last
        self._thread = threading.Thread(target=self._drain, name="g2trt-write", daemon=True)
        self._thread.start()

    def write(self, data: np.ndarray | memoryview | bytes) -> None:
        view = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        self._digest.update(view)
        self.size += len(view)
        pos = 0
        while pos < len(view):
            if self._current is None:
                self._current, self._fill = self.take(), 0
            n = min(BLOCK - self._fill, len(view) - pos)
            self._current[self._fill : self._fill + n] = view[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == BLOCK:
                self._hand_off(self._current, BLOCK)
                self._current = None

    def take(self) -> mmap.mmap:
        """A free block (waits for the writer thread to release one)."""
        while True:
            self._raise()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def commit(self, block: mmap.mmap, length: int) -> None:
        """Hash and write `block[:length]`, a block from `take()`; only the last may be short."""
        view = memoryview(block)[:length]
        self._digest.update(view)
        self.size += length
        view.release()
        self._hand_off(block, length)

    def close(self) -> str:
        """Flush, close and return the sha256 of everything written."""
        try:
            if self._current is not None and self._fill:
                self._hand_off(self._current, self._fill)
                self._current = None
            self._stop_thread()
            self._raise()
            if self._direct:
                os.ftruncate(self._fd, self.size)  # drop the last block's padding
        finally:
            self._release()
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Stop without finishing the file (the caller removes it)."""
        self._stop_thread()
        self._release()

    def __enter__(self) -> HashedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()

    def _hand_off(self, block: mmap.mmap, length: int) -> None:
        if self._ended:
            raise ValueError(f"{self.path}: a write after the short last block")
        self._ended = length < BLOCK
        self._full.put((block, length))

    def _drain(self) -> None:
        """The writer thread: full blocks to the file (the short last one padded for direct I/O)."""
        while (item := self._full.get()) is not None:
            block, length = item
            try:
                if self._error is None:
                    if self._direct and length % _ALIGN:
                        padded = -(-length // _ALIGN) * _ALIGN
                        block[length:padded] = bytes(padded - length)
                        length = padded
                    _write_all(self._fd, memoryview(block)[:length])
            except BaseException as e:  # raised in the caller's thread on its next take() or close()
                self._error = e
            self._free.put(block)

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def copy_hashed(src: Path, dst: Path, known_sha256: str | None = None) -> str:
    """Copy `src` to `dst` and return the sha256 of the bytes copied.

    A copy-on-write filesystem clones the file (no bytes move; `known_sha256`, the source's recorded hash,
    is then trusted, else the clone is read back to hash it). Elsewhere a thread reads blocks (direct I/O
    where possible) while this one hashes the previous block and a third writes the one before.
    """
    if _clone(src, dst):
        return known_sha256 or _sha256(dst)
    fd, _ = _open(src, os.O_RDONLY, True)
    try:
        with HashedWriter(dst, blocks=3) as out:
            read: queue.Queue[tuple[mmap.mmap, int] | BaseException] = queue.Queue()

            def reader() -> None:
                try:
                    while True:
                        block = out.take()
                        n = _read_full(fd, block)
                        read.put((block, n))
                        if n < BLOCK:
                            return
                except BaseException as e:  # raised in the hashing thread
                    read.put(e)

            thread = threading.Thread(target=reader, name="g2trt-read", daemon=True)
            thread.start()
            while True:
                item = read.get()
                if isinstance(item, BaseException):
                    raise item
                out.commit(*item)
                if item[1] < BLOCK:
                    break
            thread.join()
            return out.close()
    finally:
        os.close(fd)


def _read_full(fd: int, block: mmap.mmap) -> int:
    """Fill `block` from `fd`; fewer bytes only at the end of the file."""
    view, filled = memoryview(block), 0
    try:
        while filled < BLOCK and (n := os.readv(fd, [view[filled:]])):
            filled += n
    finally:
        view.release()
    return filled


def _clone(src: Path, dst: Path) -> bool:
    """A reflink of `src` at `dst` (Linux FICLONE: btrfs, XFS, ...); False where the filesystem has none."""
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return True
    except OSError:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """(fd, whether it is direct): O_DIRECT where asked for and the filesystem takes it."""
    if direct and _DIRECT:
        try:
            return os.open(path, flags | _DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]
