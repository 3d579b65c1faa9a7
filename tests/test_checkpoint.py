"""The safetensors reader: zero-copy views, dtype conversions, and clear errors on damaged files.

Valid files are written by the `safetensors` package (an independent writer); damaged ones are made by
editing their header or cutting them short.
"""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from tinyllama_ref.checkpoint import Checkpoint, SafetensorsFile, bf16_to_f32
from tinyllama_ref.errors import CheckpointError


def write(path, tensors):
    save_file(tensors, str(path))
    return str(path)


def rewrite_header(path, edit):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    return write(tmp_path / "model.safetensors", {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(np.float16),
        "c": rng.integers(-2**31, 2**31 - 1, size=(4, 2), dtype=np.int32),
    })


def test_views_are_zero_copy_and_exact(good):
    f = SafetensorsFile(good)
    from safetensors.numpy import load_file
    ref = load_file(good)
    for name in ref:
        view = f.view(f.tensors[name])
        assert not view.flags.owndata and not view.flags.writeable   # a window into the read-only map
        np.testing.assert_array_equal(view, ref[name])


def test_bf16_widening_matches_torch():
    torch = pytest.importorskip("torch")
    x = torch.randn(1000) * 1e3
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_to_f32(bits), x.to(torch.bfloat16).float().numpy())


def test_truncated_file(good):
    size = os.path.getsize(good)
    with open(good, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(CheckpointError, match="outside the .* bytes of data"):
        SafetensorsFile(good)


def test_header_length_past_end(good):
    raw = open(good, "rb").read()
    open(good, "wb").write(struct.pack("<Q", len(raw) + 100) + raw[8:])
    with pytest.raises(CheckpointError, match="runs past the end"):
        SafetensorsFile(good)


def test_absurd_header_length(good):
    raw = open(good, "rb").read()
    open(good, "wb").write(struct.pack("<Q", 2**62) + raw[8:])
    with pytest.raises(CheckpointError, match="byte limit"):
        SafetensorsFile(good)


def test_too_short(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(str(p))


def test_header_not_json(good):
    raw = open(good, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    open(good, "wb").write(raw[:8] + b"{" * n + raw[8 + n:])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(good)


def test_offsets_out_of_range(good):
    def edit(h):
        h["a"]["data_offsets"] = [0, 10**9]
    rewrite_header(good, edit)
    with pytest.raises(CheckpointError, match="tensor a: data_offsets"):
        SafetensorsFile(good)


def test_wrong_dtype_string(good):
    def edit(h):
        h["b"]["dtype"] = "F17"
    rewrite_header(good, edit)
    with pytest.raises(CheckpointError, match="tensor b: unknown dtype 'F17'"):
        SafetensorsFile(good)


def test_dtype_inconsistent_with_byte_count(good):
    def edit(h):
        h["a"]["dtype"] = "F16"        # same shape, half the bytes
    rewrite_header(good, edit)
    with pytest.raises(CheckpointError, match="tensor a: 60 bytes on disk but dtype F16"):
        SafetensorsFile(good)


def test_overlapping_tensors(good):
    def edit(h):
        b0 = h["a"]["data_offsets"][0]
        h["c"]["data_offsets"] = [b0, b0 + 32]
    rewrite_header(good, edit)
    with pytest.raises(CheckpointError, match="overlap"):
        SafetensorsFile(good)


def test_bad_shape(good):
    def edit(h):
        h["a"]["shape"] = [3, -5]
    rewrite_header(good, edit)
    with pytest.raises(CheckpointError, match="shape"):
        SafetensorsFile(good)


def test_shard_path_escaping_directory(tmp_path):
    write(tmp_path / "model-1.safetensors", {"x": np.zeros(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        Checkpoint(str(tmp_path))


def test_index_names_missing_tensor(tmp_path):
    write(tmp_path / "model-1.safetensors", {"x": np.zeros(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-1.safetensors", "y": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="in no shard"):
        Checkpoint(str(tmp_path))


def test_pickles_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    with pytest.raises(CheckpointError, match="execute arbitrary code"):
        Checkpoint(str(tmp_path))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Checkpoint(str(tmp_path / "nope"))
