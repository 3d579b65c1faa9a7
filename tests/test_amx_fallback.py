"""When AMX may not be used, kernels/amx/amx.py says so and the prefill stays on BLAS (runs on every machine)."""

import builtins
import io

import numpy as np
import pytest

from gptq_packer import make_layer
from tinyllama_ref.kernels.amx import amx
from tinyllama_ref.kernels import gptq

FLAGS_WITH_AMX = "flags\t\t: fpu avx512f avx512bw amx_bf16 amx_tile amx_int8\n"


def _cpuinfo(monkeypatch, text):
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(text) if path == "/proc/cpuinfo"
                        else real_open(path, *a, **k))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TINYLLAMA_AMX", "0")
    _cpuinfo(monkeypatch, FLAGS_WITH_AMX)
    assert amx._request() is False


def test_cpu_without_amx(monkeypatch):
    monkeypatch.delenv("TINYLLAMA_AMX", raising=False)
    _cpuinfo(monkeypatch, "flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert amx._request() is False


def test_unreadable_cpuinfo(monkeypatch):
    monkeypatch.delenv("TINYLLAMA_AMX", raising=False)

    def refuse(path, *a, **k):
        raise PermissionError(path)
    monkeypatch.setattr(builtins, "open", refuse)
    assert amx._request() is False


def test_kernel_refuses_the_tile_state(monkeypatch):
    """The CPU has AMX but Linux (or the VM) says no to arch_prctl: no tiles, so no SIGILL later."""
    monkeypatch.delenv("TINYLLAMA_AMX", raising=False)
    _cpuinfo(monkeypatch, FLAGS_WITH_AMX)

    class Libc:
        @staticmethod
        def syscall(*args):
            return -1
    monkeypatch.setattr(amx.ctypes, "CDLL", lambda *a, **k: Libc())
    assert amx._request() is False


@pytest.mark.parametrize("bits,path", [(4, "_tiles_matmul"), (3, "_tiles_matmul"), (2, "_slab_matmul"),
                                       (8, "_slab_matmul")])
def test_prefill_without_amx(monkeypatch, bits, path):
    """With available() False, a many-row matmul goes through the register tiles (3 and 4 bits) or the BLAS
    slabs (other widths), and still equals x @ W."""
    monkeypatch.setattr(amx, "available", lambda: False)
    used = []
    real = getattr(gptq, path)
    monkeypatch.setattr(gptq, path, lambda *a: used.append(1) or real(*a))
    rng = np.random.default_rng(3)
    layer = make_layer(rng, 256, 64, bits, 128, act_order=True)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq")
    x = rng.standard_normal((40, 256)).astype(np.float32)
    y = gptq.gptq_matmul(plan, x)
    assert used
    scale = float(np.abs(x @ layer["W"]).max())
    np.testing.assert_allclose(y, x @ layer["W"], rtol=1e-4, atol=1e-4 * scale)
