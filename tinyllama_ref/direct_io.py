"""Streamed layers read with direct I/O into two reused buffers, instead of through the file's memory map.

A streamed layer is read from disk on every pass (streaming.py). Through the map, its bytes land in page-cache
pages that were freed a moment before by the previous streamed layer, and the kernels then read them slowly:
on the 70B shape (Zen 5 VM, 64-token prefill) a streamed layer took 0.37 s inside a pass against 0.31 s when
the same bytes sat in this process's own memory, with the same kernels and the same arithmetic. With O_DIRECT
the disk writes the bytes straight into one of two page-aligned buffers that this process allocated once and
keeps reusing: no page cache, no copy by the CPU, no page faults.

    slot 0: layer a   (the kernels compute with it)
    slot 1: layer b   (the read-ahead thread fills it meanwhile)
    slot 0: layer c   (read only after layer a was released)

The arrays handed to the kernels are views into a slot, like the map's views: same bytes, same dtype and
shape, so every result is bit for bit the same as through the map. On macOS, which has no O_DIRECT, the
descriptor is opened with F_NOCACHE instead (platform.open_uncached). Where that is refused too (a file system
without it, another OS) the reader says so once and streaming goes through the map as before.
"""

import os

import numpy as np

from . import platform

ALIGN = 4096              # O_DIRECT offsets, lengths and buffer addresses are multiples of this
REQUEST = 64 << 20        # bytes per preadv call


def _aligned(start, end):
    """The page-aligned byte range [lo, hi) that covers [start, end)."""
    return start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN


def read_runs(ckpt, names):
    """The tensors grouped into runs that one read brings in: [(file, lo, hi, [names])], page-aligned.

    A safetensors file orders tensors by dtype and name, so one layer's tensors lie in a few stretches of the
    file (its int32 words, its fp16 scales, its norms); tensors whose aligned ranges touch share a run."""
    runs = []
    for name in sorted(names, key=lambda n: (ckpt.info(n).file, ckpt.info(n).start)):
        info = ckpt.info(name)
        lo, hi = _aligned(info.start, info.end)
        if runs and runs[-1][0] == info.file and lo <= runs[-1][2]:
            runs[-1][2] = max(runs[-1][2], hi)
            runs[-1][3].append(name)
        else:
            runs.append([info.file, lo, hi, [name]])
    return runs


def slot_bytes(ckpt, names):
    """Bytes of a slot that holds these tensors' runs."""
    return sum(hi - lo for _, lo, hi, _ in read_runs(ckpt, names))


class DirectReader:
    """Reads a layer's tensors into alternating slots; read() returns {name: array view} or None."""

    def __init__(self, ckpt, capacity):
        self.ckpt = ckpt
        self.capacity = capacity        # bytes per slot: slot_bytes() of the largest streamed layer
        self.slots = None               # two uint8 buffers, allocated at the first read
        self.next_slot = 0
        self.fds = {}                   # file path -> O_DIRECT descriptor
        self.refused = platform.uncached_io()   # why direct I/O is off (None: O_DIRECT or F_NOCACHE exists)

    @property
    def allocated_bytes(self):
        return 0 if self.slots is None else 2 * (self.capacity + ALIGN)

    def _fd(self, file):
        if file not in self.fds:
            self.fds[file] = platform.open_uncached(file)        # O_DIRECT (Linux), F_NOCACHE (macOS)
        return self.fds[file]

    def read(self, names):
        """Read the tensors into the next slot. The slot read two calls ago is overwritten: the caller uses
        one layer while the next is read, and releases a layer before asking for the one after next."""
        if self.refused is not None:
            return None
        if self.slots is None:
            self.slots = [np.empty(self.capacity + ALIGN, dtype=np.uint8) for _ in range(2)]
        buf = self.slots[self.next_slot]
        at = (-buf.ctypes.data) % ALIGN                    # first aligned byte of the slot
        arrays = {}
        try:
            for file, lo, hi, run_names in read_runs(self.ckpt, names):
                if at + hi - lo > len(buf):
                    raise ValueError(f"layer does not fit the {self.capacity}-byte slot")
                end = max(self.ckpt.info(n).end for n in run_names)
                self._read_range(self._fd(file), memoryview(buf)[at:at + hi - lo], lo, end - lo)
                for name in run_names:
                    info = self.ckpt.info(name)
                    raw = buf[at + info.start - lo:at + info.end - lo]
                    arrays[name] = raw.view(self.ckpt.raw(name).dtype).reshape(info.shape)
                at += hi - lo
        except (OSError, ValueError) as e:
            self.refused = str(e)
            self.close()
            self.slots = None
            return None
        self.next_slot ^= 1
        return arrays

    @staticmethod
    def _read_range(fd, view, offset, needed):
        """Fill view from the file at offset; at least `needed` bytes must come (the aligned end may lie past
        the end of the file, where the read stops short)."""
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:got + REQUEST]], offset + got)
            if n <= 0:
                break
            got += n
        if got < needed:
            raise OSError(f"read {got} of {needed} bytes at offset {offset}")

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


class StagedCheckpoint:
    """A checkpoint whose named tensors come from a DirectReader slot; everything else from the checkpoint."""

    def __init__(self, ckpt, arrays):
        self._ckpt, self._arrays = ckpt, arrays

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)

    def __contains__(self, name):
        return name in self._ckpt

    def raw(self, name):
        return self._arrays[name] if name in self._arrays else self._ckpt.raw(name)

    def f32(self, name):
        from .checkpoint import to_f32
        return to_f32(self.raw(name), self.info(name).dtype)
