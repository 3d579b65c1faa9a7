"""tinyllama_ref/platform.py: each Linux-only facility taken away in turn (as on macOS or another Unix), and the
streamer, the memory budget, the thread chooser and the benchmark still work, with the same numbers.

`gone` names what is missing: "proc" (no /proc: every open of a /proc path fails), "posix_fadvise",
"O_DIRECT", "madvise" (no MADV_* flags, no libc madvise), or "macos" (all of them, sysconf without
SC_AVPHYS_PAGES, sys.platform "darwin" inside platform.py and fcntl with F_NOCACHE, recorded).
"""

import builtins
import mmap
import os
import types

import numpy as np
import pytest

import tinyllama_ref
from tinyllama_ref import platform, streaming
from tinyllama_ref.make.synth import synthesize
from tinyllama_ref.memory import available_memory, current_rss, default_budget, peak_rss
from tinyllama_ref.threads import CpuMeter, ThreadChooser

FACILITIES = ["proc", "posix_fadvise", "O_DIRECT", "madvise", "macos"]
F_NOCACHE = 48                              # macOS's value (<sys/fcntl.h>); only recorded here


def take_away(monkeypatch, tmp_path, what):
    """Make this process look like a system without `what`; returns the F_NOCACHE calls seen (macos)."""
    nocache = []
    if what in ("proc", "macos"):
        monkeypatch.setattr(platform, "PROC", str(tmp_path / "no-proc"))
        real_open = builtins.open

        def no_proc_open(path, *a, **k):       # a /proc read that bypasses platform.py fails here as on macOS
            if isinstance(path, str) and path.startswith("/proc/"):
                raise FileNotFoundError(2, "No such file or directory (no /proc here)", path)
            return real_open(path, *a, **k)
        monkeypatch.setattr(builtins, "open", no_proc_open)
    if what in ("posix_fadvise", "macos"):
        monkeypatch.delattr(os, "posix_fadvise")
    if what in ("O_DIRECT", "macos"):
        monkeypatch.delattr(os, "O_DIRECT")
    if what in ("madvise", "macos"):
        for flag in [f for f in dir(mmap) if f.startswith("MADV_")]:
            monkeypatch.delattr(mmap, flag)
        monkeypatch.setattr(platform, "_libc_madvise", lambda: None)
    if what == "macos":
        monkeypatch.setattr(platform, "sys", types.SimpleNamespace(platform="darwin"))
        real_sysconf = os.sysconf

        def sysconf(name):
            if name == "SC_AVPHYS_PAGES":
                raise ValueError("unrecognized configuration name")
            return real_sysconf(name)
        monkeypatch.setattr(os, "sysconf", sysconf)
        import fcntl
        monkeypatch.setattr(fcntl, "F_NOCACHE", F_NOCACHE, raising=False)
        real_fcntl = fcntl.fcntl
        monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg=0: nocache.append((fd, cmd, arg)) or 0
                            if cmd == F_NOCACHE else real_fcntl(fd, cmd, arg))
    return nocache


@pytest.fixture(params=FACILITIES)
def gone(request, monkeypatch, tmp_path):
    nocache = take_away(monkeypatch, tmp_path, request.param)
    return types.SimpleNamespace(what=request.param, nocache=nocache)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny 4-bit act-order GPTQ model of 12 layers, and what the normal path computes on it."""
    path = str(tmp_path_factory.mktemp("platform") / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, layers=12, quiet=True)
    ref = tinyllama_ref.load(path, backend="numpy")
    ids = list(range(1, 40))
    return types.SimpleNamespace(path=path, ids=ids, logits=ref.logits(ids),
                                 greedy=ref.generate([1, 5, 9], max_new_tokens=6, stop_ids=[]))


def tight(model):
    """Re-plan a loaded model under a budget of the streaming window and 6 more layers (about half; the KV
    cache and activations take some of that room later): it must stream."""
    src = model.layers
    src.budget = src._fixed() + src.window_bytes() + 6 * max(src.file_bytes)
    src.n_resident = src._plan()
    assert 0 < src.n_resident < src.n_layers
    return src


# -- streaming -------------------------------------------------------------------------------------------------

def test_streamed_model_gives_the_same_numbers(deep, gone, monkeypatch):
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    model = tinyllama_ref.load(deep.path, backend="numpy", max_memory="100GB")
    src = tight(model)
    np.testing.assert_array_equal(model.logits(deep.ids), deep.logits)      # bit for bit, as resident
    assert model.generate([1, 5, 9], max_new_tokens=6, stop_ids=[]) == deep.greedy
    assert src.bytes_streamed > 0
    if gone.what in ("O_DIRECT",):
        assert src.reader.refused == "this OS has no O_DIRECT (nor F_NOCACHE)"
    if gone.what == "macos":
        assert src.reader.refused is None                       # F_NOCACHE stands for O_DIRECT
        assert gone.nocache and all(cmd == F_NOCACHE and arg == 1 for _, cmd, arg in gone.nocache)


def test_streamed_numba_model_without_any_linux_facility(deep, monkeypatch, tmp_path):
    take_away(monkeypatch, tmp_path, "macos")
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    model = tinyllama_ref.load(deep.path, backend="numba", max_memory="100GB")
    tight(model)
    got = model.logits(deep.ids)
    assert np.max(np.abs(got - deep.logits)) / np.max(np.abs(deep.logits)) < 1e-5
    assert model.generate([1, 5, 9], max_new_tokens=6, stop_ids=[]) == deep.greedy


def test_page_cache_hints_fall_back(deep, gone, monkeypatch):
    """drop_pages and read_ahead on a checkpoint: every byte still arrives, whatever hint is missing."""
    from tinyllama_ref.checkpoint import Checkpoint
    ckpt = Checkpoint(deep.path)
    name = next(n for n in ckpt.tensors if n.endswith("qweight"))
    ckpt.drop_pages([name])
    assert ckpt.read_ahead(name, bytearray(2**16)) == ckpt.info(name).nbytes
    ckpt.drop_pages([name], page_cache=False)
    if gone.what in ("madvise", "macos"):
        info = ckpt.info(name)
        assert not ckpt.files[info.file].populate(info.start, info.end)       # the caller preads instead


# -- the memory budget -----------------------------------------------------------------------------------------

def test_memory_figures_without_the_facility(gone):
    assert current_rss() > 0 and peak_rss() > 0
    assert available_memory() > 0 and default_budget() > 0
    if gone.what == "proc":
        # getrusage's peak stands for the current size: never less than it (a budget planned on it is safe)
        assert current_rss() == peak_rss() >= 10 * 2**20


def test_budget_too_small_is_still_refused_clearly(deep, gone):
    with pytest.raises(tinyllama_ref.MemoryBudgetError, match="too small.*give at least"):
        tinyllama_ref.load(deep.path, backend="numpy", max_memory="1MB")


def test_linux_memory_figures_are_proc_s():
    """On Linux the figures are /proc's, read as before."""
    def field(path, name):
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc here")
    assert abs(current_rss() - field("/proc/self/status", "VmRSS")) < 8 * 2**20
    assert peak_rss() >= field("/proc/self/status", "VmRSS")
    before = field("/proc/meminfo", "MemAvailable")       # other processes move it: read it around the call
    got = available_memory()
    after = field("/proc/meminfo", "MemAvailable")
    assert min(before, after) - 64 * 2**20 <= got <= max(before, after) + 64 * 2**20


# -- the thread chooser ------------------------------------------------------------------------------------------

def test_thread_chooser_without_the_facility(gone):
    meter = CpuMeter()
    chooser = ThreadChooser(2, meter=meter)
    counts = []
    for _ in range(12):
        n = chooser.choose(("decode", 1))
        counts.append(n)
        chooser.record(("decode", 1), n, 0.01)
    assert set(counts) <= {1, 2}
    if gone.what in ("proc", "macos"):
        assert meter.update() is None                # no /proc/stat: the chooser probes instead
        assert 1 in counts and counts[0] == 2        # it started with all threads and probed one
    else:
        assert meter.last is not None


# -- the benchmark -----------------------------------------------------------------------------------------------

def test_bench_generate_without_the_facility(deep, gone, monkeypatch):
    from tinyllama_ref.measure.bench_generate import bench, format_table
    real_load = tinyllama_ref.load

    def tight_load(path, **kw):
        model = real_load(path, **kw)
        tight(model)
        return model
    monkeypatch.setattr(tinyllama_ref, "load", tight_load)
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    recs = bench(deep.path, batches=(1,), prompt_tokens=4, new_tokens=2, backend="numpy")
    r = recs[0]
    assert r["streamed_bytes_per_pass"] > 0 and r["decode_s_per_pass"] > 0 and r["peak_rss_bytes"] > 0
    table = format_table(recs)
    if gone.what in ("proc", "macos"):
        assert r["disk_bytes_per_pass"] is None and "| ? |" in table
    else:
        assert r["disk_bytes_per_pass"] >= 0


# -- each facility's own fallback ---------------------------------------------------------------------------------

def test_linux_calls_are_the_ones_made_before(tmp_path, monkeypatch):
    """On Linux: posix_fadvise DONTNEED for the page cache, O_DIRECT for uncached reads."""
    if not hasattr(os, "posix_fadvise") or not hasattr(os, "O_DIRECT"):
        pytest.skip("not Linux")
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a) or real(*a))
    fd = os.open(path, os.O_RDONLY)
    platform.drop_cached(fd, 0, 4096)
    assert calls == [(fd, 0, 4096, os.POSIX_FADV_DONTNEED)]
    os.close(fd)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: opened.append(flags) or real_open(p, flags, *a))
    assert platform.uncached_io() is None
    try:
        os.close(platform.open_uncached(str(path)))
    except OSError:
        pass                                         # a file system without O_DIRECT (tmpfs): refused, as before
    assert opened == [os.O_RDONLY | os.O_DIRECT]


def test_nothing_uncached_where_neither_o_direct_nor_f_nocache(tmp_path, monkeypatch):
    import fcntl
    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.delattr(fcntl, "F_NOCACHE", raising=False)
    (tmp_path / "f").write_bytes(b"x")
    assert platform.uncached_io() == "this OS has no O_DIRECT (nor F_NOCACHE)"
    with pytest.raises(OSError):
        platform.open_uncached(str(tmp_path / "f"))
    monkeypatch.delattr(os, "posix_fadvise")
    with open(tmp_path / "f", "rb") as f:
        platform.drop_cached(f.fileno(), 0, 1)       # a no-op


def test_x86_facilities_are_never_asked_for_on_another_architecture(monkeypatch, tmp_path):
    """On aarch64 (or under qemu-user, where /proc/cpuinfo may be the x86 host's): no flags, no arch_prctl."""
    fake = tmp_path / "proc"
    fake.mkdir()
    (fake / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_bf16\n")
    monkeypatch.setattr(platform, "PROC", str(fake))
    monkeypatch.setattr(platform._stdlib_platform, "machine", lambda: "x86_64")
    assert {"avx512_vnni", "amx_tile"} <= platform.cpu_flags()
    monkeypatch.setattr(platform._stdlib_platform, "machine", lambda: "aarch64")
    assert platform.cpu_flags() == frozenset()
    monkeypatch.setattr(platform.ctypes, "CDLL", lambda *a, **k: pytest.fail("a syscall was made on aarch64"))
    assert platform.request_amx_tiles() is False


def test_mapped_files_lists_libraries_or_nothing(monkeypatch, tmp_path):
    if os.path.exists("/proc/self/maps"):
        assert any("python" in p or ".so" in p for p in platform.mapped_files())
    monkeypatch.setattr(platform, "PROC", str(tmp_path / "no-proc"))
    assert platform.mapped_files() == []
