"""Layer streaming under a memory budget: same numbers as the resident model, peak RSS under the budget."""

import json
import subprocess
import sys

import numpy as np
import pytest

import tinyllama_ref
from tinyllama_ref.errors import MemoryBudgetError
from tinyllama_ref.memory import parse_size

CHILD = r"""
import json, sys
import numpy as np
import tinyllama_ref
from tinyllama_ref.memory import current_rss, peak_rss
path, extra, out, backend = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
budget = None if extra == "none" else current_rss() + int(extra)
m = tinyllama_ref.load(path, backend=backend, max_memory=budget)
logits = m.logits(list(range(1, 200)))
gen = m.generate([[1, 5, 9], [1, 7]], max_new_tokens=12, stop_ids=[])
np.save(out, logits)
print(json.dumps({"budget": budget, "peak": peak_rss(), "n_resident": m.layers.n_resident,
                  "n_layers": m.cfg.n_layers, "streamed": m.layers.bytes_streamed, "gen": gen}))
"""


@pytest.fixture(scope="module")
def deep(hf_checkpoints):
    # 12 layers of ~3 MB: small next to the interpreter, big enough that a budget forces streaming.
    return hf_checkpoints("deep12", dtype="float32", layers=12, hidden=256, heads=8, kv_heads=2)


def run_child(tmp_path, path, extra, backend="numpy"):
    out = str(tmp_path / f"logits-{extra}-{backend}.npy")
    p = subprocess.run([sys.executable, "-c", CHILD, path, str(extra), out, backend], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), np.load(out)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_streamed_equals_resident_and_stays_under_budget(tmp_path, deep, backend):
    free, ref = run_child(tmp_path, deep, "none", backend)
    assert free["n_resident"] == free["n_layers"] and free["streamed"] == 0
    # Room above what the process already holds for the head, the window and a few layers, not all.
    extra = 45_000_000 if backend == "numpy" else 300_000_000
    tight, logits = run_child(tmp_path, deep, extra, backend)
    assert 0 < tight["n_resident"] < tight["n_layers"], tight          # it really streamed
    assert tight["streamed"] > 0
    np.testing.assert_array_equal(logits, ref)                         # bit-identical numbers
    assert tight["gen"] == free["gen"]
    if backend == "numpy":
        # numba's JIT compiler needs its reserve only while compiling; measured for the numpy path.
        assert tight["peak"] <= tight["budget"], tight


def test_budget_too_small_for_one_layer_is_clear_up_front(deep):
    with pytest.raises(MemoryBudgetError, match="too small.*give at least"):
        tinyllama_ref.load(deep, backend="numpy", max_memory="1MB")


def test_kv_cache_counts_against_the_budget(deep, monkeypatch):
    import tinyllama_ref.streaming as streaming
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    model = tinyllama_ref.load(deep, backend="numpy")
    src = model.layers
    all_layers = sum(src.file_bytes)
    src.budget = src._fixed() + all_layers                 # exactly everything, no room for a cache
    src.n_resident = src._plan()
    assert src.n_resident == src.n_layers
    half = all_layers // 2                                  # a cache this big must push layers out
    c = model.cfg
    slots = half // (2 * c.n_layers * 16 * c.n_kv_heads * c.head_dim * 4) + 1
    model.new_cache(slots, 16)
    assert 0 < src.n_resident < src.n_layers
    with pytest.raises(MemoryBudgetError, match="KV cache"):
        model.new_cache(slots * 4, 16)


@pytest.mark.parametrize("text, value", [("20GB", 20 * 10**9), ("1500MB", 1.5e9), ("16GiB", 16 * 2**30),
                                         ("123456", 123456), ("0.5GB", 5 * 10**8)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-3GB", "0", "20XB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(MemoryBudgetError):
        parse_size(text)


def test_cli_budget_error_is_one_line(deep):
    p = subprocess.run([sys.executable, "-m", "tinyllama_ref", "generate", deep, "--prompt-ids", "1,2",
                        "--max-memory", "2MB"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "too small" in p.stderr and "Traceback" not in p.stderr


def test_gptq_numba_streamed_equals_resident(tmp_path, monkeypatch):
    """Resident act-order layers are repacked at load, streamed ones read in place: same float32 results
    up to summation order, and the same greedy text."""
    import tinyllama_ref.streaming as streaming
    from tinyllama_ref.make.synth import synthesize
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    path = str(tmp_path / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, layers=12, quiet=True)
    resident = tinyllama_ref.load(path, backend="numba")
    ids = list(range(1, 40))
    ref = resident.logits(ids)
    streamed = tinyllama_ref.load(path, backend="numba")
    src = streamed.layers
    c = resident.cfg                                     # what logits(ids) reserves: KV cache, activations
    src.reserve("KV cache", 2 * c.n_layers * len(ids) * c.n_kv_heads * c.head_dim * 4)
    src.reserve("activations", resident.layers.reserved["activations"])
    src.budget = src._fixed() + 2 * max(src.file_bytes) + streaming.READ_CHUNK + 3 * max(src.file_bytes)
    src.n_resident = src._plan()
    assert 0 < src.n_resident < src.n_layers
    got = streamed.logits(ids)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5
    assert streamed.generate([1, 5, 9], max_new_tokens=6, stop_ids=[]) == \
        resident.generate([1, 5, 9], max_new_tokens=6, stop_ids=[])


def test_gptq_int8_streamed_equals_resident_and_counts_the_copy(tmp_path, monkeypatch):
    """--gptq-mode int8: a streamed act-order layer is copied in group order for each prompt pass and takes
    the resident layer's int8 GEMM, so prompt logits are the same bit for bit; the largest copy is counted in
    the budget (the tiny preset's gate/up: 64 x 172 weights at 4 bits, and two int64 row orders of 172).
    Run as on a CPU without AMX: with AMX, 4-bit streamed layers stay exact instead (test_kernels_int8_gemm)."""
    import tinyllama_ref.streaming as streaming
    from tinyllama_ref.make.synth import synthesize
    from tiers import below
    from tinyllama_ref.kernels import table
    tier = below("amx")                                  # as on a CPU without AMX
    if tier is None or not table.int8_available(tier):
        pytest.skip("int8 mode has no kernels at this process's CPU tiers")
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    path = str(tmp_path / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, layers=12, quiet=True)
    resident = tinyllama_ref.load(path, backend="numba", gptq_mode="int8", cpu=tier)
    c = resident.cfg
    assert resident.layers.scratch == c.dim * c.hidden_dim // 2 + 16 * max(c.dim, c.hidden_dim)
    assert tinyllama_ref.load(path, backend="numba", cpu=tier).layers.scratch == 0   # exact mode copies nothing
    ids = list(range(1, 40))
    ref = resident.logits(ids)
    streamed = tinyllama_ref.load(path, backend="numba", gptq_mode="int8", cpu=tier)
    src = streamed.layers
    src.reserve("KV cache", 2 * c.n_layers * len(ids) * c.n_kv_heads * c.head_dim * 4)
    src.reserve("activations", resident.layers.reserved["activations"])
    src.budget = src._fixed() + 2 * max(src.file_bytes) + streaming.READ_CHUNK + 3 * max(src.file_bytes)
    src.n_resident = src._plan()
    assert 0 < src.n_resident < src.n_layers
    np.testing.assert_array_equal(streamed.logits(ids), ref)


def test_int8_copy_is_counted_only_where_it_is_made(monkeypatch):
    """With AMX, 4-bit streamed layers of whole 32-column blocks stay on the exact code tiles in int8 mode (no
    copy, nothing counted); 3-bit layers, odd widths and CPUs without AMX count the largest copy."""
    from types import SimpleNamespace
    from tinyllama_ref.model import streamed_repack_bytes
    cfg = SimpleNamespace(dim=8192, hidden_dim=28672, n_heads=64, n_kv_heads=8, head_dim=128)
    copy4 = 8192 * 28672 // 2 + 16 * 28672                                  # codes + two int64 row orders
    for tier in ("amx", "vnni", "avx2"):                  # what the table says for each, whatever this CPU is
        has_amx = tier == "amx"
        for bits, expected in ((4, 0 if has_amx else copy4), (3, 8192 * 28672 * 3 // 8 + 16 * 28672)):
            qc = SimpleNamespace(bits=bits, desc_act=True)
            assert streamed_repack_bytes(cfg, qc, "numba", "int8", tier) == expected
            assert streamed_repack_bytes(cfg, qc, "numba", "exact", tier) == 0
        odd = SimpleNamespace(dim=64, hidden_dim=172, n_heads=4, n_kv_heads=2, head_dim=16)
        assert streamed_repack_bytes(odd, SimpleNamespace(bits=4, desc_act=True), "numba", "int8", tier) == \
            64 * 172 // 2 + 16 * 172


def _one_tensor_checkpoint(tmp_path, mb=16):
    from safetensors.numpy import save_file
    from tinyllama_ref.checkpoint import Checkpoint
    w = np.arange(mb * 2**18, dtype=np.float32).reshape(-1, 1024)            # mb MB of distinct values
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    return Checkpoint(str(tmp_path)), w


def test_read_ahead_maps_the_bytes_into_the_process(tmp_path):
    """Where Linux populates a range in one call (MADV_POPULATE_READ), read_ahead leaves the tensor's pages
    mapped in this process: its resident size grows by the tensor, and the bytes are the file's."""
    from tinyllama_ref.memory import current_rss
    ckpt, w = _one_tensor_checkpoint(tmp_path)
    info = ckpt.info("w")
    ckpt.drop_pages(["w"])
    if not ckpt.files[info.file].populate(info.start, info.start):       # an empty range: only asks
        pytest.skip("madvise(MADV_POPULATE_READ) is not available here")
    before = current_rss()
    assert ckpt.read_ahead("w", bytearray(2**20)) == w.nbytes
    assert current_rss() - before >= 0.9 * w.nbytes
    ckpt.drop_pages(["w"])
    assert current_rss() - before < 0.5 * w.nbytes                        # and released after use
    np.testing.assert_array_equal(ckpt.raw("w"), w)


def test_read_ahead_without_populate_reads_through_the_buffer(tmp_path, monkeypatch):
    """Where the kernel refuses MADV_POPULATE_READ, read_ahead falls back to pread into the reused buffer and
    reads every byte of the tensor."""
    from tinyllama_ref.checkpoint import SafetensorsFile
    ckpt, w = _one_tensor_checkpoint(tmp_path, mb=3)
    monkeypatch.setattr(SafetensorsFile, "populate", lambda self, start, end: False)
    reads = []
    real = __import__("os").preadv
    monkeypatch.setattr("os.preadv", lambda fd, bufs, pos: reads.append(pos) or real(fd, bufs, pos))
    assert ckpt.read_ahead("w", bytearray(2**20)) == w.nbytes
    assert len(reads) == 3                                                # 3 MB through a 1 MB buffer


def test_resident_layers_are_spread_over_the_depth():
    """Resident and streamed layers alternate, so each read overlaps compute; layer 0 stays resident."""
    from tinyllama_ref.streaming import spread
    assert spread(40, 80) == set(range(0, 80, 2))
    assert spread(3, 12) == {0, 4, 8}
    assert spread(0, 7) == set() and spread(7, 7) == set(range(7))
    for k in range(0, 81):
        chosen = sorted(spread(k, 80))
        assert len(chosen) == k and (k == 0 or chosen[0] == 0)
        gaps = {b - a for a, b in zip(chosen, chosen[1:])}
        assert not gaps or max(gaps) - min(gaps) <= 1, (k, gaps)
