"""Results that survive a crash: a JSONL file written a batch at a time, and resumed where it stopped.

    line 1      header: what made the file (command, checkpoint fingerprint, settings, input file's sha256)
    line 2...   one record per item, in order, each batch written with one write(), then flush and fsync

A run killed at any moment (SIGKILL included) leaves the header, some whole batches and perhaps part of
one more. `--resume` reads the file back, refuses it if the checkpoint, the settings or the input differ
from this run's (mixing results of two set-ups would be silent nonsense), drops a torn last line and any
records of a batch that was not finished, and the run continues with the next batch. Because batches are
rebuilt exactly as before, the finished file is identical, line for line, to an uninterrupted run's.
"""

import hashlib
import json
import os

from ..errors import TinyLlamaError

FORMAT = "tinyllama-ref results"
VERSION = 1
SAMPLE_BYTES = 1 << 16       # per sampled block of a weight file
SAMPLES = 16                 # blocks per weight file: enough to tell two checkpoints of one shape apart


class ResumeError(TinyLlamaError):
    """A partial output file cannot be continued by this run."""


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path):
    """A digest of a checkpoint directory that is cheap even for 40 GB of weights.

    Small files (config, tokenizer) are hashed whole; each .safetensors file by its size, its JSON header
    (every tensor's name, dtype, shape and offset) and SAMPLES blocks spread over the whole file, so two
    checkpoints of the same shape with different weights differ.
    """
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        with open(full, "rb") as f:
            if not name.endswith(".safetensors"):
                if size <= 64 << 20:
                    h.update(f.read())
                continue
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(min(n, size)))
            for k in range(SAMPLES):
                f.seek(max(0, (size - SAMPLE_BYTES) * k // max(1, SAMPLES - 1)))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def make_header(command, checkpoint, settings, input_path=None, input_sha256=None):
    """The first line of a results file. settings: everything that changes the numbers (JSON values)."""
    header = {"format": FORMAT, "version": VERSION, "command": command,
              "checkpoint": {"path": os.path.abspath(checkpoint), "fingerprint": checkpoint_fingerprint(checkpoint)},
              "settings": settings}
    if input_path is not None:
        header["input"] = {"path": os.path.abspath(input_path),
                           "sha256": input_sha256 or file_sha256(input_path)}
    return header


def _mismatch(old, new):
    """Why a partial file's header does not fit this run, or None. Paths may differ (a moved directory)."""
    if old.get("format") != FORMAT or old.get("version") != VERSION:
        return "it is not a tinyllama-ref results file of this version"
    if old.get("command") != new["command"]:
        return f"it holds results of `{old.get('command')}`, not `{new['command']}`"
    if old.get("checkpoint", {}).get("fingerprint") != new["checkpoint"]["fingerprint"]:
        return (f"it was made with another checkpoint ({old.get('checkpoint', {}).get('path')}), "
                f"this run uses {new['checkpoint']['path']}")
    if old.get("input", {}).get("sha256") != new.get("input", {}).get("sha256"):
        return (f"its input file {old.get('input', {}).get('path')} had other contents than "
                f"{new.get('input', {}).get('path')} has now")
    old_s, new_s = old.get("settings", {}), new["settings"]
    differ = [key for key in sorted(set(old_s) | set(new_s)) if old_s.get(key) != new_s.get(key)]
    if differ:
        return (f"it was made with {', '.join(f'{k}={old_s.get(k)!r}' for k in differ)}; this run has "
                f"{', '.join(f'{k}={new_s.get(k)!r}' for k in differ)}")
    return None


def read_partial(path):
    """(header or None, [records], [byte offset after each record's line]) of a results file; a torn last
    line (no newline: killed mid-write) is left out."""
    with open(path, "rb") as f:
        data = f.read()
    lines, ends, pos = [], [], 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        lines.append(data[pos:nl])
        ends.append(nl + 1)
        pos = nl + 1
    if not lines:
        return None, [], []
    try:
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:]]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ResumeError(f"{path}: not a tinyllama-ref results file (a line is not JSON); "
                          "remove it or write to another -o") from None
    return header, records, ends


def _previous_records(path, header, resume):
    """(records, line ends) of an existing file made with the same header, or None for a new file.

    Without resume an existing file is an error (it might be hours of work); a header that differs is one too.
    """
    exists = os.path.exists(path)
    if exists and not resume:
        raise ResumeError(f"{path} already exists: add --resume to continue it, or remove it to start over")
    if not exists:
        return None
    old, records, ends = read_partial(path)
    if old is None:                                  # not even a whole header line: start again
        return None
    why = _mismatch(old, json.loads(json.dumps(header)))     # as the file holds it: tuples read back as lists
    if why:
        raise ResumeError(f"cannot resume {path}: {why}. Remove it, or write to another -o")
    return records, ends


def _open_for_append(path, header, keep_bytes):
    """The file opened for appending: a new one holding the header (keep_bytes None), or the old one cut back
    to keep_bytes (whole batches only). Both are synced before the first batch."""
    try:
        if keep_bytes is None:
            f = open(path, "wb")
            f.write((json.dumps(header) + "\n").encode())
            _sync(f)
            _sync_dir(path)
        else:
            f = open(path, "r+b")
            f.truncate(keep_bytes)
            f.seek(keep_bytes)
            _sync(f)
    except OSError as e:
        raise ResumeError(f"{path}: cannot write ({e.strerror})") from None
    return f


class ResultsWriter:
    """Append-only JSONL results with a header; use `ResultsWriter.open(...)`, then `append` per batch."""

    def __init__(self, path, header, records, f):
        self.path, self.header, self.records, self._f = path, header, records, f

    @classmethod
    def open(cls, path, header, resume=False, boundaries=None, start_number=1, number_key="item"):
        """Start a results file, or with resume continue one (refusing a mismatch).

        boundaries: the record counts at which batches start (and the total); the records of a batch that
        was cut short are dropped, so it is run again whole. Without resume an existing file is an error:
        it might be hours of work.
        """
        records, keep_bytes = [], None
        previous = _previous_records(path, header, resume)
        if previous is not None:
            records, ends = previous
            for k, r in enumerate(records):
                if not isinstance(r, dict) or r.get(number_key) != start_number + k:
                    raise ResumeError(f"{path}: line {k + 2} is not record {start_number + k}; the file "
                                      "was edited or mixed, remove it to start over")
            n = len(records)
            if boundaries is not None:
                n = max(b for b in boundaries if b <= len(records))
            records = records[:n]
            keep_bytes = ends[n]             # ends[0] is the end of the header line
        f = _open_for_append(path, header, keep_bytes)
        return cls(path, header, records, f)

    @property
    def n_done(self):
        return len(self.records)

    def append(self, records):
        """Write a batch's records with one write(), then flush and fsync: on disk before the next batch."""
        if not records:
            return
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        self._f.write(data)
        _sync(self._f)
        self.records.extend(records)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _sync(f):
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path):
    """fsync the directory too, so a new file's name survives a crash as well as its contents."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path):
    """Fail before any work if path cannot be written (no directory, no permission)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ResumeError(f"{path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ResumeError(f"{path}: not writable")


class KeyedLog:
    """Answers to requests, by a key of the request (lm-eval's resumable log): a header line, then
    {"key": ..., "value": ...} lines written a batch at a time like ResultsWriter's. Order does not matter,
    so a batch cut short keeps the answers it wrote."""

    def __init__(self, path, header, resume=False):
        self.path = path
        self.values, keep = {}, None
        previous = _previous_records(path, header, resume)
        if previous is not None:
            records, ends = previous
            self.values = {r["key"]: r["value"] for r in records}
            keep = ends[-1]
        self._f = _open_for_append(path, header, keep)

    @staticmethod
    def key(*parts):
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def append(self, pairs):
        """[(key, value)] of one batch: one write(), flush, fsync."""
        if not pairs:
            return
        self._f.write("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in pairs).encode())
        _sync(self._f)
        self.values.update(pairs)

    def close(self):
        self._f.close()
