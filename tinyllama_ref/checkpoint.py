"""Reading safetensors checkpoints as zero-copy views into memory-mapped files.

The format (huggingface/safetensors README): 8 bytes little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw data; offsets count
from byte 8 + N. Tensors are C-ordered, little-endian.

We parse the header ourselves instead of using the `safetensors` package because its NumPy API copies each
tensor into RAM and has no bfloat16. Here a tensor is `np.frombuffer` over an `mmap`: nothing is read from
disk until the model touches it, and the OS can drop the pages again (see streaming.py).
"""

import glob
import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from . import platform
from .config import check_regular_file, json_type, parse_json, read_json
from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024   # the reference implementation caps the header at 100 MB too

# safetensors dtype string -> NumPy dtype, for reading and for make/safetensors_writer.py (the one table). BF16
# has no NumPy dtype: it is read as uint16 and widened on use.
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str            # safetensors dtype string, e.g. "F16", "BF16", "I32"
    shape: tuple
    file: str             # path of the file that holds it
    start: int            # absolute byte offset in that file
    end: int

    @property
    def nbytes(self):
        return self.end - self.start


def bf16_to_f32(u16):
    """bfloat16 bits (as uint16) -> float32: bfloat16 is the top half of a float32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def to_f32(array, dtype):
    """Any stored float tensor as float32 (a copy unless it already is float32)."""
    if dtype == "BF16":
        return bf16_to_f32(array)
    return np.asarray(array, dtype=np.float32)


class SafetensorsFile:
    """One .safetensors file: its validated header plus a read-only memory map of the whole file."""

    def __init__(self, path):
        self.path = path
        # A directory, FIFO or device in place of the file is refused before open(): opening a FIFO for
        # reading waits for a writer that never comes.
        check_regular_file(path, CheckpointError, "safetensors file")
        try:
            self._fd = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        try:
            self._read_header()
        except BaseException:
            self._fd.close()
            raise

    def _read_header(self):
        path = self.path
        size = os.fstat(self._fd.fileno()).st_size
        self.size = size
        if size < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file")
        n = int.from_bytes(self._fd.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} bytes is larger than the {MAX_HEADER_BYTES} "
                                  "byte limit (not a safetensors file, or corrupt)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file "
                                  "(truncated download?)")
        raw = self._fd.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path}: could read only {len(raw)} of the {n} header bytes")
        header = parse_json(raw, f"{path}: header", CheckpointError)
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header must be a JSON object, found {json_type(header)}")
        self.metadata = self._check_metadata(header.pop("__metadata__", None))
        self._mmap = mmap.mmap(self._fd.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = None                  # the map's address, for populate()
        self.tensors = self._validate(header, data_start=8 + n)

    def _check_metadata(self, meta):
        """__metadata__ is a string-to-string map (or absent / null), as the safetensors format defines it."""
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: __metadata__ must be an object of strings, found "
                                  f"{json_type(meta)}")
        for key, value in meta.items():
            if not isinstance(value, str):
                raise CheckpointError(f"{self.path}: __metadata__ entry {key!r} must be a string, found "
                                      f"{json_type(value)} {value!r}")
        return meta

    def _validate(self, header, data_start):
        path, data_size = self.path, self.size - data_start
        tensors = {}
        for name, entry in header.items():
            where = f"{path}: tensor {name}"
            if not isinstance(entry, dict):
                raise CheckpointError(f"{where}: header entry is not an object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(f"{where}: unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
            if (not isinstance(shape, list)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
                raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
            begin, end = offsets
            if not 0 <= begin <= end <= data_size:
                raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] fall outside the "
                                      f"{data_size} bytes of data (truncated or corrupt file)")
            # Python integers: a shape like [2**62 + 64, 4] must not wrap around to a small byte count.
            expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise CheckpointError(f"{where}: {end - begin} bytes on disk but dtype {dtype} with shape "
                                      f"{shape} needs {expected}")
            tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)
        spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
        for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
            if start < prev_end:
                raise CheckpointError(f"{path}: tensors {prev} and {name} overlap in the data section")
        return tensors

    def view(self, info):
        """The tensor as a read-only NumPy view into the memory map (no bytes are read yet)."""
        dt = np.dtype(DTYPES[info.dtype]).newbyteorder("<")
        count = info.nbytes // dt.itemsize
        if count == 0:
            return np.zeros(info.shape, dtype=dt)
        return np.frombuffer(self._mmap, dtype=dt, count=count, offset=info.start).reshape(info.shape)

    def release(self, start, end):
        """Drop a byte range of this file's map (page-aligned outward) from this process's memory
        (platform.release_pages: madvise MADV_DONTNEED); used by the streamer."""
        if self._mmap is None:
            return
        page = mmap.PAGESIZE
        lo = (start // page) * page
        hi = min(self.size, -(-end // page) * page)
        if hi > lo:
            platform.release_pages(self._mmap, lo, hi - lo)

    def populate(self, start, end):
        """Read a byte range from disk and map it into this process in one call (madvise
        MADV_POPULATE_READ, Linux 5.14+), so the kernels that read it next take no page faults and no byte is
        copied through a buffer. Through ctypes, which releases the GIL for the call: the main thread computes
        while this one waits for the disk. False where the call is refused (older kernels, other systems)."""
        if self._mmap is None:
            return False
        page = mmap.PAGESIZE
        lo = (start // page) * page
        hi = min(self.size, -(-end // page) * page)
        if hi <= lo:
            return True
        if self._base is None:
            self._base = np.frombuffer(self._mmap, dtype=np.uint8).ctypes.data
        return platform.populate(self._base + lo, hi - lo)

    def close(self):
        # Views may still point into the map; closing it would invalidate them, so only the fd is closed.
        self._fd.close()


def _refuse_pickles(directory):
    pickles = [os.path.basename(p) for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt")
               for p in glob.glob(os.path.join(directory, pat))]
    raise CheckpointError(
        f"{directory}: found {', '.join(sorted(pickles))} but no .safetensors file. PyTorch pickle files are "
        "refused because loading one can execute arbitrary code. Convert once with transformers: "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)")


class Checkpoint:
    """All tensors of a checkpoint directory (one file, or shards listed in model.safetensors.index.json)."""

    def __init__(self, directory):
        if not isinstance(directory, (str, os.PathLike)):
            raise CheckpointError(f"checkpoint path must be a string or os.PathLike, got {directory!r}")
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        self.directory = os.path.abspath(directory)
        index = os.path.join(self.directory, "model.safetensors.index.json")
        self._weight_map = None
        if os.path.lexists(index):
            shard_names = self._shards_from_index(index)
        else:
            shard_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.directory,
                                                                                     "*.safetensors")))
            if not shard_names:
                if glob.glob(os.path.join(self.directory, "*.bin")) or \
                        glob.glob(os.path.join(self.directory, "*.pt")):
                    _refuse_pickles(self.directory)
                raise CheckpointError(f"{self.directory}: no .safetensors file found")
        self.files = {}
        self.tensors = {}
        for shard in shard_names:
            f = SafetensorsFile(os.path.join(self.directory, shard))
            self.files[f.path] = f
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{f.path}: tensor {name} also appears in {self.tensors[name].file}")
                self.tensors[name] = info
        if self._weight_map is not None:
            self._check_index(index)

    def _shards_from_index(self, index):
        data = read_json(index, CheckpointError)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        for name, shard in weight_map.items():
            # A shard name is a plain file name in this directory; anything else could read files elsewhere.
            if (not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", "..")
                    or os.path.isabs(shard) or "\0" in shard):
                raise CheckpointError(f"{index}: tensor {name} points to shard {shard!r}, which is not a "
                                      "plain file name inside the checkpoint directory")
        self._weight_map = weight_map
        return sorted(set(weight_map.values()))

    def _check_index(self, index):
        """The index and the shards' headers must tell the same story, tensor by tensor."""
        missing = [n for n in self._weight_map if n not in self.tensors]
        if missing:
            raise CheckpointError(f"{index}: lists {len(missing)} tensors that are in no shard, "
                                  f"e.g. {missing[0]}")
        for name, info in self.tensors.items():
            listed = self._weight_map.get(name)
            if listed is None:
                raise CheckpointError(f"{info.file}: tensor {name} is not listed in {index}")
            if os.path.join(self.directory, listed) != info.file:
                raise CheckpointError(f"{index}: lists tensor {name} in {listed}, but it is in "
                                      f"{os.path.basename(info.file)}")

    # -- access ------------------------------------------------------------------------------------------
    def __contains__(self, name):
        return name in self.tensors

    def info(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing from the checkpoint") from None

    def raw(self, name):
        """Zero-copy view with the stored dtype (BF16 as uint16)."""
        info = self.info(name)
        return self.files[info.file].view(info)

    def f32(self, name):
        """The tensor as float32 (a copy for F16/BF16; a view for F32)."""
        info = self.info(name)
        return to_f32(self.raw(name), info.dtype)

    def metadata(self):
        meta = {}
        for f in self.files.values():
            meta.update(f.metadata)
        return meta

    def nbytes(self):
        return sum(t.nbytes for t in self.tensors.values())

    # -- page cache (streaming.py reads layers ahead and drops them after use) --------------------------------
    def read_ahead(self, name, buffer):
        """Bring a tensor's bytes from disk into memory before a kernel reads them; returns the bytes read.

        I/O only, without the GIL: a read-ahead thread runs it while the main thread computes. Mapped straight
        into this process where Linux can (SafetensorsFile.populate: no copy, no page faults later); otherwise read
        through `buffer` (a reused bytearray) with os.preadv, so the bytes land in the page cache.
        """
        info = self.info(name)
        if self.files[info.file].populate(info.start, info.end):
            return info.end - info.start
        fd = self.files[info.file]._fd.fileno()
        view = memoryview(buffer)
        pos = info.start
        while pos < info.end:
            n = os.preadv(fd, [view[:min(len(buffer), info.end - pos)]], pos)
            if n <= 0:
                break
            pos += n
        return pos - info.start

    def drop_pages(self, names, page_cache=True):
        """Release the tensors' pages from this process (MADV_DONTNEED) and, with page_cache, from the
        kernel's page cache too (POSIX_FADV_DONTNEED: the next reader goes to the disk; platform.py says what
        stands for both elsewhere)."""
        for name in names:
            info = self.tensors[name]
            self.files[info.file].release(info.start, info.end)
        for name in names if page_cache else ():
            info = self.tensors[name]
            platform.drop_cached(self.files[info.file]._fd.fileno(), info.start, info.nbytes)
