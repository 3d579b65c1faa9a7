"""Column blocks taken in turn by the decode threads (kernels/generic/tasks.py): the guided schedule against
a hand-computed case and its definition, and the counter's atomicity under two threads."""

import numba
import numpy as np
import pytest
from numba import njit, prange

from tinyllama_ref.kernels.generic import tasks


def test_guided_bounds_hand_computed():
    """4096 columns in units of 64 for 2 threads: each block is ceil(left / 256) units (left = 4096, 3072,
    2304, 1728, 1280, 960, 704, 512, 384, 256, 192, 128, 64 columns)."""
    sizes = [1024, 768, 576, 448, 320, 256, 192, 128, 128, 64, 64, 64, 64]
    np.testing.assert_array_equal(tasks.guided(4096, 64, 2), np.cumsum([0] + sizes))


@pytest.mark.parametrize("n_out,unit,threads", [(11008, 64, 2), (4096, 32, 3), (77, 32, 2), (40, 64, 2),
                                                (8192, 64, 8), (1000, 32, 1)])
def test_guided_bounds_follow_their_definition(n_out, unit, threads):
    """From 0 to n_out; every block but the last is whole units; each block is the units needed to cover
    left / (2 threads) of what is left, so sizes never grow; one thread takes one block."""
    bounds = tasks.guided(n_out, unit, threads)
    assert bounds[0] == 0 and bounds[-1] == n_out and bounds.dtype == np.int64
    sizes = np.diff(bounds)
    assert (sizes > 0).all() and (sizes[:-1] % unit == 0).all()
    if threads == 1:
        assert len(sizes) == 1
        return
    for b, size in enumerate(sizes[:-1]):
        left = n_out - bounds[b]
        assert size == max(unit, -(-left // (2 * threads * unit)) * unit)
    assert (np.diff(sizes[:-1]) <= 0).all()


def test_uniform_bounds():
    np.testing.assert_array_equal(tasks.uniform(100, 40), [0, 40, 80, 100])
    np.testing.assert_array_equal(tasks.uniform(64, 32), [0, 32, 64])


@njit(parallel=True, cache=False)
def _take_all(n_tasks, counter, taken_by, spin):
    at = np.int64(counter.ctypes.data)
    for worker in prange(numba.get_num_threads()):
        b = tasks.next_block(at)
        while b < n_tasks:
            taken_by[b] += worker + 1                  # a task taken twice would read more than one worker's id
            s = 0.0
            for i in range(spin):                      # a little work, so that both threads take tasks
                s += np.sqrt(np.float64(i + b))
            if s < 0:
                taken_by[b] = -100
            b = tasks.next_block(at)


def test_every_task_is_taken_once_by_two_threads():
    """Two threads taking 20,000 tasks from one counter: each task exactly once (a non-atomic increment
    hands some out twice or skips them), and the counter ends past the last."""
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        counter = tasks.counter()
        taken_by = np.zeros(20000, dtype=np.int64)
        _take_all(20000, counter, taken_by, 20)
    finally:
        numba.set_num_threads(threads)
    assert set(np.unique(taken_by)) <= {1, 2}
    assert counter[0] >= 20000


def _decode_kernels():
    """(name, tier, prepare tier, f(plan, xp, blocks)) for the integer decode kernels that take column bounds."""
    from tinyllama_ref.kernels.avx2 import int8 as avx2_int8
    from tinyllama_ref.kernels.vnni import int8 as vnni_int8
    from tinyllama_ref.kernels.vnni import split8

    def int8_with(module):
        return lambda plan, xp, blocks: module.gptq_matmul_int8(
            plan, xp, np.empty((xp.shape[0], plan.n_out), dtype=np.float32), blocks)
    return [("split8", "vnni", "vnni", split8.gptq_matmul_split),
            ("int8 vnni", "vnni", "vnni", int8_with(vnni_int8)),
            ("int8 avx2 row-major", "avx2", "vnni", int8_with(avx2_int8)),
            ("int8 avx2 strips", "avx2", "avx2", int8_with(avx2_int8))]


@pytest.mark.parametrize("case", range(4), ids=lambda i: ["split8", "int8-vnni", "int8-avx2", "int8-avx2-strips"][i])
def test_integer_decode_kernels_give_the_same_bits_for_any_schedule(case):
    """split8 and both int8 GEMVs (row-major and in strips): guided schedules planned for 1, 2 and 3 threads,
    run on one and two threads, give the bits of fixed 32-column blocks, for 1 and 8 rows."""
    from gptq_packer import make_layer
    from tiers import TOP
    from tinyllama_ref.kernels import cpu, gptq
    name, tier, prepare_tier, fn = _decode_kernels()[case]
    if not cpu.at_least(TOP, tier):
        pytest.skip(f"needs the {tier} CPU tier; this process runs {TOP}")
    rng = np.random.default_rng(case)
    layer = make_layer(rng, 512, 320, 4, 128, act_order=True, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        tier=prepare_tier if cpu.at_least(TOP, prepare_tier) else tier)
    unit = gptq._block_unit(plan)
    threads = numba.get_num_threads()
    try:
        for n_rows in (1, 8):
            xp = gptq.permute_x(plan, rng.standard_normal((n_rows, 512)).astype(np.float32))
            numba.set_num_threads(1)
            expected = fn(plan, xp, 32)
            for run_on in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(run_on)
                for planned in (1, 2, 3):
                    np.testing.assert_array_equal(fn(plan, xp, tasks.guided(320, unit, planned)), expected, name)
    finally:
        numba.set_num_threads(threads)
