"""Writing safetensors files one tensor at a time, so a 36 GB checkpoint never sits in memory.

A safetensors file is laid out (huggingface/safetensors README) as

    8 bytes little-endian N | N bytes of JSON header | data

and the header already holds every tensor's byte range, so the whole header can be computed from the list of
(name, dtype, shape) alone, before a single value exists. The writer does exactly that: it writes the header,
then accepts each tensor's bytes in header order, in as many chunks as the caller likes, and checks that every
tensor receives exactly the bytes its dtype and shape promise.

Nothing is written half-way: the bytes go to `.partial-<name>` beside the target (a hidden name, so the
checkpoint reader's `*.safetensors` glob never sees it) and are renamed into place only after the last byte
arrived and was flushed to disk. Any error removes the partial file (or keeps it, for a caller that wants to find
what a long run left behind, e.g. quantize's `model.safetensors.partial`).

This is the project's one safetensors writer: synth streams random slabs through it in the reference order,
quantize streams each layer's packed tensors through it as they are produced (order="given").

Layout choices copy the reference writer (the Rust core behind `safetensors.numpy.save_file`) so that our
files are byte-for-byte what it would write for the same tensors:
  - data sorted by dtype, widest alignment first (I32 before F16), then by name;
  - header keys in that same order, `__metadata__` first, compact JSON, padded with spaces to 8 bytes.
(The reference writes the keys inside `__metadata__` in hash-map order, which varies from run to run; we keep
the caller's order, so files are identical to the reference's when the metadata has a single key.)
"""

import json
import os
from dataclasses import dataclass

import numpy as np

from ..checkpoint import DTYPES          # dtype string -> NumPy dtype (BF16 travels as uint16 bit patterns)
from ..errors import CheckpointError
from .files import partial_path

# The order of the Rust `Dtype` enum in safetensors; its writer sorts by this, descending, then by name.
_RUST_DTYPE_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about a tensor before its values exist."""
    name: str
    dtype: str        # safetensors dtype string: "F16", "BF16", "I32", ...
    shape: tuple

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize


def data_order(specs):
    """The specs in the order the reference writer stores them (dtype rank descending, then name)."""
    return sorted(specs, key=lambda s: (-_RUST_DTYPE_ORDER.index(s.dtype), s.name))


def build_header(specs, metadata=None, order="reference"):
    """(header bytes including the 8-byte length prefix, specs in data order) for these tensors.

    order="reference": the reference writer's bytes (data_order, `__metadata__` first, compact JSON).
    order="given": the plainest layout the format description allows, for a writer that produces tensors one
    after the other and cannot reorder them: data in the specs' order, `__metadata__` last, JSON with the
    default ", " / ": " spacing (what a writer written from the format description alone produces)."""
    for s in specs:
        if s.dtype not in DTYPES:
            raise CheckpointError(f"tensor {s.name}: dtype {s.dtype!r} cannot be written "
                                  f"(expected one of {', '.join(DTYPES)})")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"tensor {dup} is listed twice; a safetensors file holds each name once")
    if order not in ("reference", "given"):
        raise ValueError(f"order must be 'reference' or 'given', got {order!r}")
    ordered = data_order(specs) if order == "reference" else list(specs)
    if metadata:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise CheckpointError(f"__metadata__ must map strings to strings, found {bad}")
    header = {"__metadata__": dict(metadata)} if metadata and order == "reference" else {}
    offset = 0
    for s in ordered:
        header[s.name] = {"dtype": s.dtype, "shape": [int(d) for d in s.shape],
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if metadata and order == "given":
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":") if order == "reference" else None).encode("utf-8")
    text += b" " * (-len(text) % 8)        # padded with spaces so the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, ordered


def file_size(specs, metadata=None, order="reference"):
    """The exact size in bytes of the file these specs make (header plus data)."""
    header, ordered = build_header(specs, metadata, order)
    return len(header) + sum(s.nbytes for s in ordered)


class SafetensorsWriter:
    """Stream tensors into one safetensors file; use as a context manager.

        specs = [TensorSpec("a", "F16", (4, 8)), TensorSpec("b", "I32", (3,))]
        with SafetensorsWriter("out/model.safetensors", specs, {"format": "pt"}) as w:
            for spec in w.order:                  # header order: I32 "b" first, then F16 "a"
                for chunk in make_chunks(spec):   # any split along the first axis, C order
                    w.write(spec.name, chunk)

    Leaving the block normally checks that every tensor is complete and renames the file into place; leaving
    it with an exception deletes the partial file (keeps it with keep_partial=True) and lets the exception
    through. order: "reference" (the reference writer's layout) or "given" (the specs' order, see
    build_header). partial: the path written before the rename (default `.partial-<name>` beside `path`).

    resume=True continues a partial file left with keep_partial, if it starts with exactly this header (same
    tensors, same metadata): `resumed` then lists the leading tensors whose bytes are all there, read_back()
    returns them, rewind(n) keeps only the first n, and writing goes on after them. Any other partial file is
    overwritten.
    """

    def __init__(self, path, specs, metadata=None, order="reference", partial=None, keep_partial=False,
                 resume=False):
        self.path = os.path.abspath(path)
        self.header, self.order = build_header(list(specs), metadata, order)
        self.size = len(self.header) + sum(s.nbytes for s in self.order)
        self.partial = os.path.abspath(partial) if partial else partial_path(self.path)
        self.keep_partial = keep_partial
        self.resume = resume
        self.resumed = []        # names of the leading tensors a resumed partial file already holds
        self._names = {s.name for s in self.order}
        self._file = None
        self._index = 0          # the tensor being written, as an index into self.order
        self._written = 0        # bytes of that tensor received so far
        self.bytes_done = 0      # data bytes received in total (for progress reports)

    # -- the context manager ------------------------------------------------------------------------------
    def __enter__(self):
        if self.resume and self._partial_has_this_header():
            self._file = open(self.partial, "r+b")
            self.resumed = self._complete_tensors()
            self.rewind(len(self.resumed))
            return self
        self._file = open(self.partial, "wb")
        try:
            self._file.write(self.header)
        except BaseException:
            self.abort()
            raise
        self._skip_empty()
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.abort()
            return False
        try:
            self.finish()
        except BaseException:
            self.abort()
            raise
        return False

    # -- resuming -----------------------------------------------------------------------------------------
    def _partial_has_this_header(self):
        try:
            with open(self.partial, "rb") as f:
                return f.read(len(self.header)) == self.header
        except OSError:
            return False

    def _complete_tensors(self):
        room = os.fstat(self._file.fileno()).st_size - len(self.header)      # data bytes on disk
        names = []
        for spec in self.order:
            if spec.nbytes > room:
                break
            room -= spec.nbytes
            names.append(spec.name)
        return names

    def _start(self, index):
        """Absolute file offset of tensor order[index]."""
        return len(self.header) + sum(s.nbytes for s in self.order[:index])

    def rewind(self, n):
        """Keep only the first n tensors of a resumed file; the next write is tensor order[n]."""
        if not 0 <= n <= len(self.resumed):
            raise ValueError(f"rewind({n}): the partial file holds {len(self.resumed)} complete tensors")
        self.resumed = self.resumed[:n]
        self._index, self._written = n, 0
        end = self._start(n)
        self.bytes_done = end - len(self.header)
        self._file.truncate(end)
        self._file.seek(end)
        self._skip_empty()

    def read_back(self, name):
        """A tensor of a resumed file (one of `resumed`), read from disk."""
        if name not in self.resumed:
            raise CheckpointError(f"{self.partial}: tensor {name} is not among the complete tensors of the "
                                  "resumed file")
        index = next(i for i, s in enumerate(self.order) if s.name == name)
        spec = self.order[index]
        data = os.pread(self._file.fileno(), spec.nbytes, self._start(index))
        if len(data) != spec.nbytes:
            raise CheckpointError(f"{self.partial}: tensor {name} could be read only in part")
        return np.frombuffer(data, dtype=np.dtype(DTYPES[spec.dtype]).newbyteorder("<")).reshape(spec.shape)

    # -- writing ------------------------------------------------------------------------------------------
    @property
    def current(self):
        """The spec of the tensor the next write must belong to (None when all are done)."""
        return self.order[self._index] if self._index < len(self.order) else None

    def _skip_empty(self):
        while self.current is not None and self.current.nbytes == 0:
            self._index += 1

    def write(self, name, chunk):
        """Append the next bytes of tensor `name`: a C-contiguous array of the tensor's dtype."""
        chunk = np.asarray(chunk)
        if chunk.size == 0 and name in self._names:
            return      # nothing to append (empty tensors are skipped, so they may be "written" at any time)
        spec = self.current
        if spec is None:
            raise CheckpointError(f"{self.path}: tensor {name} written after every tensor in the header was "
                                  "complete")
        if name != spec.name:
            raise CheckpointError(f"{self.path}: tensor {name} written while {spec.name} is still missing "
                                  f"{spec.nbytes - self._written} of its {spec.nbytes} bytes (tensors must "
                                  "arrive in header order)")
        want = np.dtype(DTYPES[spec.dtype]).newbyteorder("<")
        if chunk.dtype != want:
            raise CheckpointError(f"{self.path}: tensor {name} is {spec.dtype} in the header but a chunk of "
                                  f"dtype {chunk.dtype} arrived")
        if chunk.ndim != len(spec.shape) or tuple(chunk.shape[1:]) != tuple(spec.shape[1:]):
            raise CheckpointError(f"{self.path}: tensor {name} has shape {list(spec.shape)} but a chunk of "
                                  f"shape {list(chunk.shape)} arrived (chunks split the first axis only)")
        if self._written + chunk.nbytes > spec.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name} would get {self._written + chunk.nbytes} bytes "
                                  f"but dtype {spec.dtype} with shape {list(spec.shape)} holds {spec.nbytes}")
        self._file.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        self._written += chunk.nbytes
        self.bytes_done += chunk.nbytes
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def finish(self):
        """Check completeness, flush to disk and rename into place."""
        spec = self.current
        if spec is not None:
            raise CheckpointError(f"{self.path}: closed with tensor {spec.name} holding {self._written} of its "
                                  f"{spec.nbytes} bytes (and {len(self.order) - self._index - 1} tensors after "
                                  "it not written)")
        self._file.flush()
        os.fsync(self._file.fileno())
        written = self._file.tell()
        self._file.close()
        self._file = None
        if written != self.size:
            raise CheckpointError(f"{self.partial}: {written} bytes on disk, expected {self.size}")
        os.replace(self.partial, self.path)

    def abort(self):
        """Close and delete the partial file (unless keep_partial); safe to call twice."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        if self.keep_partial:
            return
        try:
            os.remove(self.partial)
        except FileNotFoundError:
            pass
