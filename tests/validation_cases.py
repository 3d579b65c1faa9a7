"""Hostile checkpoints for the validation tests: one small edit of a good synthetic checkpoint per case.

A case names the checkpoints it applies to ("gptq": 4-bit g32 act-order, "dense": fp16, "sharded": fp16 in 2
shards with an index), the edit, the error class load() must raise, and strings the message must contain
(the file, the key or the tensor). Each case is run through the Python API and through the CLI.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass

from tinyllama_ref.errors import TinyLlamaError

ALL = ("gptq", "dense", "sharded")
FILE = "model.safetensors"
Q = "model.layers.1.self_attn.q_proj"          # a linear every checkpoint has
DOWN = "model.layers.2.mlp.down_proj"


@dataclass
class Case:
    id: str
    edit: object                     # edit(checkpoint_dir)
    error: type = TinyLlamaError
    needles: tuple = ()              # substrings of the message
    kinds: tuple = ALL


# -- making and editing checkpoints ----------------------------------------------------------------------

def make_base(kind, out):
    from tinyllama_ref.make.synth import synthesize
    if kind == "gptq":
        synthesize(out, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    elif kind == "dense":
        synthesize(out, preset="tiny", dense_dtype="fp16", quiet=True)
    else:
        synthesize(out, preset="tiny", dense_dtype="fp16", shards=2, quiet=True)
    return out


def shard_of(d, tensor):
    """The safetensors file (name) of a checkpoint directory that holds `tensor`."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        return json.load(open(index))["weight_map"][tensor]
    return FILE


def read_header(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def fresh(path, mode="wb"):
    """Open for writing as a new file: copies of the base checkpoint share its files' inodes (hard links)."""
    if os.path.lexists(path):
        os.remove(path)
    return open(path, mode)


def write_header(path, header, data, raw_json=None):
    text = raw_json if raw_json is not None else json.dumps(header).encode()
    with fresh(path) as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def header_edit(fn, tensor=None):
    """An edit of the header of the file holding `tensor` (the first file without one): fn(header)."""
    def edit(d):
        name = shard_of(d, tensor) if tensor else sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[0]
        path = os.path.join(d, name)
        header, data = read_header(path)
        fn(header)
        write_header(path, header, data)
    return edit


def set_entry(tensor, **fields):
    def fn(h):
        h[tensor].update(fields)
    return header_edit(fn, tensor)


def drop_tensor(tensor):
    def edit(d):
        header_edit(lambda h: h.pop(tensor), tensor)(d)
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(index):
            data = json.load(open(index))
            data["weight_map"].pop(tensor)
            json.dump(data, fresh(index, "w"))
    return edit


def add_tensor(new, like):
    """A tensor `new` in the same file as `like`, with like's dtype and shape, over like's bytes' copy."""
    def edit(d):
        name = shard_of(d, like)
        path = os.path.join(d, name)
        header, data = read_header(path)
        entry = dict(header[like])
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [len(data), len(data) + end - begin]
        header[new] = entry
        write_header(path, header, data + data[begin:end])
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(index):
            m = json.load(open(index))
            m["weight_map"][new] = name
            json.dump(m, fresh(index, "w"))
    return edit


def transpose(tensor):
    def fn(h):
        h[tensor]["shape"] = h[tensor]["shape"][::-1]
    return header_edit(fn, tensor)


def reshape(tensor, shape_of):
    def fn(h):
        h[tensor]["shape"] = shape_of(h[tensor]["shape"])
    return header_edit(fn, tensor)


def json_edit(name, fn):
    """Load a JSON file of the checkpoint, fn(obj) edits it in place or returns a replacement."""
    def edit(d):
        path = os.path.join(d, name)
        obj = json.load(open(path)) if os.path.exists(path) else {}
        new = fn(obj)
        with fresh(path, "w") as f:
            json.dump(obj if new is None else new, f)
    return edit


def set_key(name, key, value):
    def fn(obj):
        obj[key] = value
    return json_edit(name, fn)


def del_key(name, key):
    return json_edit(name, lambda obj: obj.pop(key) and None)


def raw_file(name, content):
    def edit(d):
        with fresh(os.path.join(d, name)) as f:
            f.write(content)
    return edit


def replace_with_dir(name):
    def edit(d):
        path = os.path.join(d, name)
        if os.path.exists(path):
            os.remove(path)
        os.mkdir(path)
    return edit


def replace_with_fifo(name):
    def edit(d):
        path = os.path.join(d, name)
        if os.path.exists(path):
            os.remove(path)
        os.mkfifo(path)
    return edit


def first_shard_with_fifo(d):
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    replace_with_fifo(sorted(set(index["weight_map"].values()))[0])(d)


def both(*edits):
    def edit(d):
        for e in edits:
            e(d)
    return edit


# -- running ------------------------------------------------------------------------------------------------

def cli(*args, timeout=120, input=None):
    """The CLI as a user runs it: a fresh process, stdout and stderr apart."""
    return subprocess.run([sys.executable, "-m", "tinyllama_ref", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, input=input)


def assert_one_line_error(p, needles=(), code=1):
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), p.stderr
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr)


def copy_base(base, dst):
    """A copy whose files are hard links to the base's (every edit above writes a new file, never in place)."""
    shutil.copytree(base, dst, copy_function=os.link)
    return dst

