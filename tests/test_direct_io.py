"""Streamed layers read with O_DIRECT into two reused slots (tinyllama_ref/direct_io.py).

The slot contents are checked against the file's bytes located by a header parser written here from the
safetensors description (8-byte length, JSON header, offsets relative to the end of the header), and streamed
passes against the resident model, through the slots and through the map.
"""

import json
import os
import struct

import numpy as np
import pytest

import tinyllama_ref
from tinyllama_ref.checkpoint import Checkpoint
from tinyllama_ref.direct_io import ALIGN, DirectReader, slot_bytes

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def file_tensors(path):
    """{name: array} read from the file with plain reads, as the safetensors format lays it out."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            begin, end = spec["data_offsets"]
            f.seek(8 + n + begin)
            out[name] = np.frombuffer(f.read(end - begin), dtype=DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return out


@pytest.fixture(scope="module")
def gptq_path(tmp_path_factory):
    from tinyllama_ref.make.synth import synthesize
    path = str(tmp_path_factory.mktemp("direct") / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, layers=6, quiet=True)
    return path


def reader_for(path):
    ckpt = Checkpoint(path)
    names = [[n for n in ckpt.tensors if n.startswith(f"model.layers.{i}.")] for i in range(6)]
    reader = DirectReader(ckpt, max(slot_bytes(ckpt, ns) for ns in names))
    if reader.read(names[0]) is None:
        pytest.skip(f"no direct I/O on this file system: {reader.refused}")
    return ckpt, names, reader


def test_slots_hold_the_files_bytes(gptq_path):
    ckpt, names, reader = reader_for(gptq_path)
    expected = file_tensors(os.path.join(gptq_path, "model.safetensors"))
    for i in (1, 4):
        arrays = reader.read(names[i])
        assert sorted(arrays) == sorted(names[i])
        for name, a in arrays.items():
            assert a.dtype == expected[name].dtype and a.shape == expected[name].shape, name
            np.testing.assert_array_equal(a, expected[name])
            assert a.ctypes.data % ALIGN == ckpt.info(name).start % ALIGN     # aligned as in the file


def test_a_layer_survives_the_next_read_and_its_slot_is_reused_by_the_one_after(gptq_path):
    ckpt, names, reader = reader_for(gptq_path)
    expected = file_tensors(os.path.join(gptq_path, "model.safetensors"))
    a = reader.read(names[1])
    b = reader.read(names[2])
    q1, q2 = "model.layers.1.mlp.up_proj.qweight", "model.layers.2.mlp.up_proj.qweight"
    np.testing.assert_array_equal(a[q1], expected[q1])                 # still layer 1 after reading layer 2
    assert not np.shares_memory(a[q1], b[q2])
    c = reader.read(names[3])
    slot_a = reader.slots[0] if np.shares_memory(a[q1], reader.slots[0]) else reader.slots[1]
    assert all(np.shares_memory(t, slot_a) for t in c.values())        # layer 3 went where layer 1 was
    np.testing.assert_array_equal(b[q2], expected[q2])


def test_a_layer_too_big_for_the_slot_turns_direct_io_off(gptq_path):
    ckpt = Checkpoint(gptq_path)
    names = [n for n in ckpt.tensors if n.startswith("model.layers.0.")]
    reader = DirectReader(ckpt, ALIGN)
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this OS has no O_DIRECT")
    assert reader.read(names) is None and "does not fit" in reader.refused
    assert reader.slots is None and reader.read(names) is None


def streamed_model(path, backend, n_resident=2):
    model = tinyllama_ref.load(path, backend=backend)
    model.layers._plan = lambda: n_resident          # whatever is reserved: 2 -> layers 0 and 3 resident
    model.layers.n_resident = n_resident
    return model


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_streamed_through_the_slots_equals_resident(gptq_path, backend):
    ids = list(range(1, 30))
    ref = tinyllama_ref.load(gptq_path, backend=backend).logits(ids)
    model = streamed_model(gptq_path, backend)
    got = model.logits(ids)
    if model.layers.reader.refused is not None:
        pytest.skip(f"no direct I/O on this file system: {model.layers.reader.refused}")
    assert model.layers.reader.slots is not None and model.layers.bytes_streamed > 0
    # Streamed act-order layers are read in place, resident ones repacked (numba): same sums up to order.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))
    np.testing.assert_array_equal(model.logits(ids), got)            # and the same again on the next pass


def test_refused_direct_io_streams_through_the_map(gptq_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)
    ids = list(range(1, 30))
    ref = streamed_model(gptq_path, "numpy").logits(ids)
    monkeypatch.setattr(os, "open", no_direct)
    model = streamed_model(gptq_path, "numpy")
    got = model.logits(ids)
    assert model.layers.reader.refused and model.layers.reader.slots is None
    assert model.layers.bytes_streamed > 0
    np.testing.assert_array_equal(got, ref)


def test_a_pass_stopped_midway_leaves_no_stale_slot(gptq_path):
    """A pass that ends early (an error) leaves a read in flight; later passes must not use a slot that was
    filled for another layer since. Splits (resident layers by n_resident, of 6): 2 -> {0, 3}, streamed
    1, 2, 4, 5; 4 -> {0, 1, 3, 4}, streamed 2, 5."""
    ids = list(range(1, 30))
    model = streamed_model(gptq_path, "numpy")
    ref = model.logits(ids)
    for stop_after in (1, 2, 3):
        layers = iter(model.layers)
        for _ in range(stop_after):
            next(layers)
        layers.close()
        np.testing.assert_array_equal(model.logits(ids), ref)
    layers = iter(model.layers)
    next(layers)                                     # layer 0; layer 1 is being read ahead into a slot
    layers.close()
    model.layers._plan = lambda: 4                   # layer 1 resident now: reads of 2 and 5 reuse both slots
    np.testing.assert_array_equal(model.logits(ids), ref)
    model.layers._plan = lambda: 2                   # layer 1 streamed again, and first: read afresh
    np.testing.assert_array_equal(model.logits(ids), ref)
