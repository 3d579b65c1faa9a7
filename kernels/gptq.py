"""Fast GPTQ matmuls in Numba: the layouts prepared at load and the one entry point, gptq_matmul().

They compute what tinyllama_ref/quant.py's reference does (float32 arithmetic throughout), without ever
building a float copy of the whole weight matrix. The files, one idea each:
  gptq.py          (this file) what prepare() makes of a layer once at load, and gptq_matmul(), which runs
                   the kernel that table.py names for the layer, the number of rows, the mode and the tier
  cpu.py           the CPU tier (generic, avx2, avx512, vnni, amx), probed once
  table.py         the one table from (layout, mode, bits, tier, rows) to a kernel; docs/kernels.md shows it
  llvm.py          the LLVM IR helpers every intrinsic uses
  generic/         every CPU: the fused GEMV and its passes, the in-place act-order kernels, slabs + BLAS
  avx2/            16 ymm registers: split8 and int8 on maddubs/madd, 6 x 16 register tiles
  avx512/          32 zmm registers: 12 x 32 register tiles
  vnni/            vpdpbusd: split8 (exact decode), the int8 mode's GEMV and GEMM
  amx/             AMX tiles: 4-bit codes into bfloat16 tiles, dequantized slabs split in two bfloat16s

Layouts, prepared once per layer by prepare() (cost reported by GPTQLinear.prepare_seconds):
  "segments"  qw [R, out] uint32: the checkpoint's qweight viewed as unsigned (zero-copy) or, for act-order
              with several groups, a repacked copy whose input rows are sorted by group (still packed codes).
              Runs of whole "units" of packed rows (1 word for 2/4/8 bits, 3 words = 32 codes for 3 bits)
              that belong to one group form the segments; for a repacked layer perm holds the original input
              of each sorted row (-1 for padding: every group is padded to a multiple of 32 inputs). Per call
              x is permuted once (`in` floats) instead of touching the weights. On the tiers of
              table.strip_width a repacked 4-bit copy is stored in strips of 64 or 32 columns instead of row-major
              (generic/strips.py: qw [S * R, W], a decode thread's columns one run of memory); the table
              calls it the "strips" layout.
  "inplace"   (prepare(..., repack=False), for act-order layers streamed from disk every token, where the
              repack would cost more than reading the layer): qw is qweight exactly as mapped and g_idx is
              kept; see gptq_inplace.py. Same float32 results up to summation order; slower per decode call.
  const_zero  the true zero when every group and column shares it (symmetric GPTQ), so the kernels need not
              unpack qzeros; -1 otherwise.
"""

# How the OpenMP workers behind prange wait between kernels is set in tinyllama_ref/__init__.py.

import functools
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from . import compile_note, cpu, table
from .table import GEMV_MAX_ROWS
from .amx import amx, amx_codes
from .avx512 import gptq_tiles
from .generic.gptq_gemv import gemv
from .generic.gptq_inplace import dequantize_slab_inplace, gemv_inplace
from .generic.gptq_passes import or_code_u32, unit_shape
from .generic.gptq_prefill import dequantize_slab
from .generic.slabs import run_slabs
from .generic import strips, tasks
from .vnni import split8

BOUND_MAX_ROWS = 32        # calls of up to this many rows (decode passes) reuse a call bound once (bound_call)
GEMV_TASKS_PER_THREAD = 1  # column blocks per thread: one long block each streams best (the hardware
                           # prefetchers follow long runs of each packed row; measured 1.2-1.3x over two)
INPLACE_SCALE_BYTES = 256 * 2**10   # "inplace" plans: fp16 scales of one column block, all groups (L2-resident)
INPLACE_MAX_BLOCK = 1024            # "inplace" plans: widest column block
TILE_FLOATS = 8 * 2**20    # prefill: float32 slabs (all input rows x some columns) of at most 32 MB in all
                           # threads together; see kernels/generic/slabs.py for why each thread runs its own
SMALL_PREFILL_ROWS = 128   # up to this many rows BLAS spends few flops per weight, so the slab must stay in
SMALL_PREFILL_COLUMNS = 64 # L2 while BLAS reads it: 64 columns (1-3 MB at 4096-11008 inputs). Measured on the
                           # 7B shapes, 64 rows, one thread: 64 columns 1.3x faster than 1024; at 512 rows the
                           # wide slabs of TILE_FLOATS are 1.1x faster than 64 columns


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def repack_rows(qw, perm, bits, new_qw):
    """new_qw: packed codes whose code row t is the original code row perm[t] (a zero code where perm < 0).

    qw [R, out] uint32 original, new_qw [R2, out] uint32 zero-filled. prange over 256-column strips; rows
    are written in order, each read as 64 bits from its source word so straddling codes need no branch.
    """
    mask = (1 << bits) - 1
    n_words = qw.shape[0]
    n_new_words = new_qw.shape[0]
    n_out = qw.shape[1]
    strip = 256
    for c in prange((n_out + strip - 1) // strip):
        c0 = c * strip
        cw = min(n_out, c0 + strip) - c0
        for t in range(perm.shape[0]):
            src = perm[t]
            if src < 0:
                continue
            pos = src * bits
            w = pos >> 5
            shift = pos & 31
            row0 = qw[w, c0:c0 + cw]
            row1 = qw[min(w + 1, n_words - 1), c0:c0 + cw]
            dpos = t * bits
            dw = dpos >> 5
            dshift = dpos & 31
            dst0 = new_qw[dw, c0:c0 + cw]
            dst1 = new_qw[min(dw + 1, n_new_words - 1), c0:c0 + cw]
            spill = dshift + bits > 32
            for j in range(cw):
                q = ((np.int64(row0[j]) | (np.int64(row1[j]) << 32)) >> shift) & mask
                placed = q << dshift
                dst0[j] |= np.uint32(placed & 0xFFFFFFFF)
                if spill:
                    dst1[j] |= np.uint32(placed >> 32)


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def repack_words(qw, perm, bits, new_qw):
    """repack_rows for 2, 4 and 8 bits, where every code lies inside one word: each new word is assembled
    from its 32 // bits source codes in a row buffer (32-bit lanes, 16 columns per instruction) and written
    once. Measured on the 7B shapes: about 10x faster than repack_rows, which matters because every resident
    act-order layer is repacked when a process first uses it (7B: 224 matrices).

    new_qw [S * R2, W] in either layout of generic/strips.py (row-major: [R2, out]), zero-filled."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    n_out = qw.shape[1]
    width, n_new = strips.shape_of(new_qw, n_out)
    strip = 256                          # the strip's source rows (in x 1 KB / per_word) stay in L2
    for c in prange((n_out + strip - 1) // strip):
        c0 = c * strip
        cw = min(n_out, c0 + strip) - c0
        buf = np.empty(cw, dtype=np.uint32)
        for dw in range(n_new):
            buf[:] = 0
            for k in range(per_word):
                src = perm[dw * per_word + k]
                if src < 0:
                    continue
                pos = src * bits
                row = qw[pos >> 5, c0:c0 + cw]
                for j in range(np.uint64(cw)):
                    buf[j] = or_code_u32(buf[j], row[j], pos & 31, mask, k * bits)
            j = 0
            while j < cw:                                   # one piece per strip the 256 columns touch
                col = c0 + j
                piece = min(cw - j, width - col % width)
                r = (col // width) * n_new + dw
                new_qw[r, col % width:col % width + piece] = buf[j:j + piece]
                j += piece


@dataclass(repr=False)
class SegmentsPlan:
    """The "segments" layout (module docstring): runs of whole units of packed rows that share one group."""
    bits: int
    qw: np.ndarray              # [R, out] uint32: the checkpoint's qweight (zero-copy) or a repacked copy
    n_in: int                   # real inputs
    n_padded: int               # inputs in the plan's row order, padding included (whole units)
    seg_start: np.ndarray       # [S + 1] int64: first unit of each segment
    seg_group: np.ndarray       # [S] int64: group of each segment
    scales: np.ndarray          # [G, out] uint16 (fp16 bits)
    qzeros: np.ndarray          # [G, Z] uint32
    zero_add: int               # 1 for the "gptq" format (stored zero + 1), 0 for "gptq_v2"
    const_zero: int             # the one true zero of the layer, or -1
    repacked: bool              # qw is a copy sorted by group (its checkpoint pages are not needed)
    prepare_note: str
    perm: np.ndarray = None     # repacked: [padded] int64 original input of each sorted row, -1 for padding
    gather: np.ndarray = None   # repacked: perm with padding pointing at an extra zero column (permute_x)
    tier: str = "generic"       # the CPU tier whose kernels run this layer (cpu.py, table.py)
    n_out: int = 0              # output columns
    strip: int = 0              # columns per strip of qw (generic/strips.py): n_out for the row-major layout
    layout = "segments"

    @property
    def n_packed(self):
        """Packed rows R of the layer: qw is [S * R, W] (generic/strips.py)."""
        return self.qw.shape[0] // (self.n_out // self.strip)

    @functools.cached_property
    def whole_blocks(self):
        """Every segment starts on a block of 4 packed rows (32 inputs at 4 bits): asked on every call by the
        kernels that work in such blocks (split8, amx_codes), so computed once."""
        return bool(np.all(self.seg_start % 4 == 0))

    def __repr__(self):
        strips = f", strips of {self.strip}" if self.strip != self.n_out else ""
        return (f"SegmentsPlan(bits={self.bits}, segments={len(self.seg_group)}, repacked={self.repacked}{strips}, "
                f"tier={self.tier}, prepare={self.prepare_note})")


@dataclass(repr=False)
class InplacePlan:
    """The "inplace" layout (module docstring): qweight as mapped, read through g_idx (streamed layers)."""
    bits: int
    qw: np.ndarray              # [R, out] uint32: the checkpoint's qweight, never copied
    n_in: int
    n_padded: int               # inputs padded to whole units (padding reads group 0 with x = 0)
    g_idx: np.ndarray           # [padded] int64
    n_groups: int
    scales: np.ndarray          # [G, out] uint16 (fp16 bits)
    qzeros: np.ndarray          # [G, Z] uint32
    zero_add: int
    const_zero: int
    prepare_note: str = "in place (act-order read through g_idx)"
    tier: str = "generic"
    n_out: int = 0
    layout = "inplace"
    repacked = False
    perm = None

    @property
    def n_packed(self):
        """Packed rows R of the layer (qw [R, out], row-major as in the checkpoint)."""
        return self.qw.shape[0]

    def __repr__(self):
        return f"InplacePlan(bits={self.bits}, groups={self.n_groups}, tier={self.tier}, prepare={self.prepare_note})"


def _segments(unit_groups):
    """Runs of equal group among consecutive units -> (seg_start [S + 1], seg_group [S])."""
    change = np.flatnonzero(np.diff(unit_groups)) + 1                        # [S - 1]
    seg_start = np.concatenate([[0], change, [len(unit_groups)]]).astype(np.int64)   # [S + 1]
    return seg_start, unit_groups[seg_start[:-1]].astype(np.int64)           # [S]


def _constant_zero(qzeros, bits, n_out, zero_add):
    """The true zero if every group and column shares it (symmetric GPTQ: 8 for 4 bits), else -1. Compares all
    of qzeros once at load (a few percent of the layer's bytes) so the kernel may skip unpacking it."""
    words = np.ascontiguousarray(qzeros).view(np.uint32)                    # [G, Z]
    if words.size == 0:
        return -1
    stored = int(words[0, 0]) & ((1 << bits) - 1)
    period = 3 if bits == 3 else 1                       # words after which a constant stream repeats
    stream = 0
    for t in range(period * 32 // bits):
        stream |= stored << (t * bits)
    pattern = np.array([(stream >> (32 * k)) & 0xFFFFFFFF for k in range(period)], dtype=np.uint32)
    expected = np.resize(pattern, words.shape[1])                           # [Z]
    used = np.full(words.shape[1], 0xFFFFFFFF, dtype=np.uint32)             # [Z] bits that hold codes
    tail = n_out * bits - 32 * (words.shape[1] - 1)
    used[-1] = (1 << tail) - 1 if tail < 32 else 0xFFFFFFFF
    if np.all((words & used) == (expected & used)):
        return (stored + zero_add) & ((1 << bits) - 1)
    return -1


def kernels_for(plan, mode="exact", max_rows=None):
    """The compiled kernels (Numba dispatchers) that gptq_matmul can call for this plan, read from the table
    (up to max_rows activation rows): what a test checks against the calls."""
    names = table.kernels_for(table.layer_of(plan), mode, plan.tier, max_rows)
    return [d for name in names for d in table.dispatchers(name)]


def prepare(qweight, qzeros, scales, g_idx, bits, checkpoint_format, repack=True, tier=None, strips_ok=True,
            mode="exact"):
    """The kernel layout for one validated layer (see the module docstring).

    Zero-copy when every unit of packed rows lies in one group and groups come in few runs (no act-order, or
    act-order with a single group). Otherwise (act-order with several groups, or 3-bit inputs not a multiple
    of 32) the codes are repacked with input rows sorted by group, each group padded to whole units, unless
    repack=False: then the plan reads the checkpoint's qweight in place through g_idx (layout "inplace",
    gemv_inplace / dequantize_slab_inplace; no copy, slower per call: for layers streamed from disk).
    tier: the CPU tier whose kernels run the layer (cpu.resolve; None: this process's, or for a repacked layer
    the one table.repacked_tier gives). A repacked layer is stored in column strips (generic/strips.py) as
    table.strip_width says for the tier and the model's gptq mode, unless strips_ok is False (tests and
    benchmarks compare the two layouts).
    """
    named = tier is not None
    tier = cpu.resolve(tier)
    n_in, n_out = len(g_idx), qweight.shape[1]
    unit_words, unit_codes = unit_shape(bits)
    zero_add = 1 if checkpoint_format == "gptq" else 0
    const_zero = _constant_zero(qzeros, bits, n_out, zero_add)
    n_groups = scales.shape[0]
    g = np.asarray(g_idx, dtype=np.int64)                                    # [in]
    qw = qweight.view(np.uint32)                                             # [R, out], no copy
    n_units = -(-n_in // unit_codes)
    padded = np.concatenate([g, np.full(n_units * unit_codes - n_in, -1)])   # [units * codes]
    per_unit = padded.reshape(n_units, unit_codes)                          # [units, codes]
    first = per_unit[:, 0]                                                   # [units]
    uniform = np.all((per_unit == first[:, None]) | (per_unit < 0))
    if uniform and qw.shape[0] == n_units * unit_words:
        seg_start, seg_group = _segments(first)
        if len(seg_group) <= 2 * n_groups:
            plan = SegmentsPlan(bits=bits, qw=qw, n_in=n_in, n_padded=n_units * unit_codes,
                                seg_start=seg_start, seg_group=seg_group, scales=scales.view(np.uint16),
                                qzeros=np.ascontiguousarray(qzeros).view(np.uint32),
                                zero_add=zero_add, const_zero=const_zero, repacked=False, prepare_note="zero-copy",
                                tier=tier, n_out=n_out, strip=n_out)
            return plan
    if not repack:
        return _inplace_plan(qw, qzeros, scales, g, bits, zero_add, const_zero, tier)
    compile_note.before_call([repack_rows if bits == 3 else repack_words], "GPTQ kernels")   # the repack runs now
    if not named:
        tier = table.repacked_tier(tier, bits, mode)
    # Sort input rows by group (stable, so a layer without act-order keeps its order), pad each group.
    order = np.argsort(g, kind="stable")                                     # [in]
    counts = np.bincount(g, minlength=n_groups)                              # [G]
    # Pad every group to whole blocks of 32 inputs (a whole number of units for every bit width), so the
    # int8-activation mode (kernels/vnni/int8.py) can use any repacked layer; GPTQ's own groups need no padding.
    units = -(-counts // 32) * (32 // unit_codes)                            # [G] units per group
    perm = np.full(int(units.sum()) * unit_codes, -1, dtype=np.int64)        # [units2 * codes]
    seg_start = np.concatenate([[0], np.cumsum(units)]).astype(np.int64)     # [G + 1]
    taken = 0
    for grp in range(n_groups):
        c = int(counts[grp])
        start = int(seg_start[grp]) * unit_codes
        perm[start:start + c] = order[taken:taken + c]
        taken += c
    keep = units > 0
    seg_group = np.flatnonzero(keep).astype(np.int64)                        # [S] non-empty groups
    seg_start = np.concatenate([seg_start[:-1][keep], [seg_start[-1]]]).astype(np.int64)   # [S + 1]
    width = (table.strip_width(tier, bits, n_out, mode) if strips_ok else 0) or n_out
    n_new = int(units.sum()) * unit_words
    new_qw = strips.zeros_aligned((n_out // width * n_new, width), np.uint32)   # [S * R2, W] (generic/strips.py)
    (repack_rows if bits == 3 else repack_words)(qw, perm, bits, new_qw)   # 3 bits: codes straddle words
    gather = np.where(perm >= 0, perm, n_in)                                 # [padded] see permute_x
    plan = SegmentsPlan(bits=bits, qw=new_qw, n_in=n_in, n_padded=len(perm), seg_start=seg_start,
                        seg_group=seg_group, scales=scales.view(np.uint16),
                        qzeros=np.ascontiguousarray(qzeros).view(np.uint32), zero_add=zero_add,
                        const_zero=const_zero, repacked=True,
                        prepare_note=f"repacked {new_qw.nbytes / 1e6:.1f} MB sorted by group"
                                     + (f" in strips of {width} columns" if width != n_out else ""), perm=perm,
                        gather=gather, tier=tier, n_out=n_out, strip=width)
    return plan


def _inplace_plan(qw, qzeros, scales, g, bits, zero_add, const_zero, tier):
    """The "inplace" layout: qweight as mapped, plus g_idx padded to whole units (padding inputs read group 0
    and x = 0). Only O(in) bookkeeping is made here; nothing the size of the weights."""
    n_in = len(g)
    unit_codes = unit_shape(bits)[1]
    n_padded = -(-n_in // unit_codes) * unit_codes
    gi = np.zeros(n_padded, dtype=np.int64)                                   # [padded]
    gi[:n_in] = g
    return InplacePlan(bits=bits, qw=qw, n_in=n_in, n_padded=n_padded, g_idx=gi, n_groups=scales.shape[0],
                       scales=scales.view(np.uint16), qzeros=np.ascontiguousarray(qzeros).view(np.uint32),
                       zero_add=zero_add, const_zero=const_zero, tier=tier, n_out=qw.shape[1])


def inplace_block(n_out, n_groups):
    """Output columns per gemv_inplace task. The block's fp16 scales, sc [G, block], are read once per code and
    must stay in L2 (INPLACE_SCALE_BYTES); within that, wider is better up to about INPLACE_MAX_BLOCK columns,
    since each packed row of the block is a separate stream (measured on the 70B shapes, one thread: 1024
    columns 1.5x faster than 128 at G = 64; 576 columns 1.6x faster than 64 at G = 224). At least 64 columns,
    a multiple of 32 so every block starts on a qzeros word."""
    per_task = -(-n_out // max(1, numba.get_num_threads()))
    cap = min(INPLACE_MAX_BLOCK, max(64, (INPLACE_SCALE_BYTES // (2 * n_groups)) // 32 * 32))
    return max(32, min(cap, -(-per_task // 32) * 32))


def repack_inplace(plan):
    """The "segments" plan of an "inplace" one: its packed rows copied in group order (prepare's repack).

    int8 mode on a streamed act-order layer: the int8 GEMM needs each block of 32 inputs in one group, and
    copying the layer's words in group order costs less than the exact in-place kernels' extra work. Measured
    at 64 rows on 8192 x 28672 (4-bit g128, 2 threads): repack 27 ms + int8 GEMM 32 ms against 131 ms for the
    exact in-place slabs. The copy lives for one call; its bytes are counted in the memory budget
    (model.streamed_repack_bytes)."""
    return prepare(plan.qw, plan.qzeros, plan.scales, plan.g_idx[:plan.n_in], plan.bits,
                   "gptq" if plan.zero_add == 1 else "gptq_v2", repack=True, tier=plan.tier, mode="int8")


def int8_copies_inplace(bits, n_out, tier=None):
    """Whether int8 mode copies a streamed ("inplace") layer of this shape in group order for its many-row calls
    (repack_inplace, then the int8 GEMM): the table's answer, which the memory budget reserves for."""
    return table.int8_copies(table.Layer("inplace", bits, n_out), tier or cpu.process_tier())


def _tiles_matmul(plan, x):
    """Prefill on register tiles that decode the packed codes (kernels/avx512/gptq_tiles.py): x [N, in] packed once
    in the plan's row order, slabs of columns spread over the threads like the BLAS slabs. y is padded to
    whole tiles of rows while it is written."""
    n_rows, n_out = x.shape[0], plan.n_out
    unit_codes = unit_shape(plan.bits)[1]
    row_start = np.concatenate([[0], np.cumsum(gptq_tiles.row_tiles(n_rows))]).astype(np.int64)   # [T + 1]
    gather = plan.gather if plan.perm is not None else np.minimum(np.arange(plan.n_padded), plan.n_in)
    xpk = np.empty((len(row_start) - 1, plan.n_padded, gptq_tiles.SLOTS), dtype=np.float32)   # [T, K, 12]
    gptq_tiles.pack_x(x, gather, row_start, xpk)
    y = np.empty((row_start[-1], n_out), dtype=np.float32)                   # [Np, out]
    columns = gptq_tiles.slab_columns(n_out, n_rows, numba.get_num_threads())
    zero_rows = plan.scales.shape[0] if plan.const_zero < 0 else 1
    if plan.layout == "segments":
        runs, run_group = gptq_tiles.split_runs(plan.seg_start, plan.seg_group, plan.bits)
        chunks = gptq_tiles.chunk_runs(runs, plan.bits)
        _slabs_with_scratch(n_out, columns, lambda: (np.empty((zero_rows, columns), dtype=np.float32),),
                            lambda j0, j1, zm: gptq_tiles.slab_segments(
                                plan.qw, xpk, row_start, runs, run_group, chunks, plan.scales, plan.qzeros,
                                plan.bits, plan.zero_add, plan.const_zero, j0, j1, zm, y))
    else:
        tiles = -(-columns // gptq_tiles.TILE_COLUMNS)
        shape = (tiles, plan.n_groups, gptq_tiles.TILE_COLUMNS)                 # [column tiles, G, 32]
        _slabs_with_scratch(n_out, columns, lambda: (np.empty(shape, dtype=np.float32),
                                                     np.empty(shape if plan.const_zero < 0 else (1, 1, 32),
                                                              dtype=np.float32)),
                            lambda j0, j1, sc, zm: gptq_tiles.slab_inplace(
                                plan.qw, xpk, row_start, plan.g_idx, plan.n_padded // unit_codes, plan.scales,
                                plan.qzeros, plan.bits, plan.zero_add, plan.const_zero, j0, j1, sc, zm, y))
    return y[:n_rows]


def _slab_matmul(x, n_out, dequantize):
    """Prefill: y [N, out] = x [N, in] @ W, W dequantized a slab of columns at a time by dequantize(j0, j1, t)
    into t [in, j1 - j0] (one scratch per thread, never the whole matrix) and multiplied with BLAS; the slabs
    are spread over the threads by kernels/generic/slabs.py."""
    n_rows, n_in = x.shape
    y = np.empty((n_rows, n_out), dtype=np.float32)                          # [N, out]
    threads = max(1, numba.get_num_threads())
    if n_rows <= SMALL_PREFILL_ROWS:
        columns = SMALL_PREFILL_COLUMNS
    else:
        # As wide as TILE_FLOATS allows, in a multiple of `threads` slabs of equal width (multiples of 32),
        # so no thread is left with a last slab alone (measured: 7% of the threads' time idle at 512 rows).
        cap = max(64, TILE_FLOATS // threads // n_in // 32 * 32)
        count = threads * -(-n_out // (threads * cap))
        columns = max(64, -(-(-(-n_out // count)) // 32) * 32)

    def work(j0, j1, flat):
        t = flat[:n_in * (j1 - j0)].reshape(n_in, j1 - j0)                      # [in, j1 - j0]
        dequantize(j0, j1, t)
        np.matmul(x, t, out=y[:, j0:j1])                                      # [N, j1 - j0], BLAS writes y
    _slabs_with_scratch(n_out, columns, lambda: (np.empty(n_in * columns, dtype=np.float32),), work)
    return y


def _slabs_with_scratch(n_out, columns, make_scratch, work):
    """run_slabs where each thread gets its own scratch arrays, made once by make_scratch() on its first slab
    and passed on as work(j0, j1, *scratch)."""
    scratch = {}

    def lane(j0, j1, worker):
        if worker not in scratch:
            scratch[worker] = make_scratch()
        work(j0, j1, *scratch[worker])
    run_slabs(n_out, columns, lane)


def _amx_matmul(x, n_out, product, make_extra=tuple):
    """Prefill on AMX (kernels/amx/amx.py): x split once into bfloat16 tiles; product(xs, j0, j1, *scratch, y)
    dequantizes and multiplies one slab of columns per call (amx.product_segments / product_inplace) with the
    thread's scratch: tile [KC, SLAB], bv [2, KC / 2, SLAB] and whatever make_extra() adds. y is padded to
    whole 32-row blocks while it is written."""
    xs = amx.split_rows(x)                                                   # [3, Np / 16, in / 32, 16, 32]
    y = np.empty((xs.shape[1] * 16, n_out), dtype=np.float32)                # [Np, out]

    def make_scratch():
        return (np.empty((amx.KC, amx.SLAB), dtype=np.float32),              # [KC, SLAB]
                np.empty((2, amx.KC // 2, amx.SLAB), dtype=np.uint32),       # [2, KC / 2, SLAB]
                *make_extra())
    _slabs_with_scratch(n_out, amx.SLAB, make_scratch, lambda j0, j1, *scratch: product(xs, j0, j1, *scratch, y))
    return y[:x.shape[0]]


def _amx_gathered_matmul(plan, x):
    """Prefill of a 4-bit "inplace" plan on AMX (amx_codes.product_gathered): x put in group order once, the
    codes gathered per segment and slab, slabs of amx_codes.SLAB columns spread over the threads."""
    n_rows, n_out = x.shape[0], plan.n_out
    src, seg_start, seg_group = amx_codes.group_order(plan.g_idx, plan.n_in, plan.n_groups)
    xg = np.empty((n_rows, len(src)), dtype=np.float32)                      # [N, Kp] x in group order
    gather_columns(x, np.where(src >= 0, src, plan.n_in), xg)
    sumx = np.add.reduceat(xg, seg_start[:-1] * 32, axis=1)                 # [N, S] (padding adds 0)
    xs = amx.split_rows(xg)                                                  # [3, Np / 16, Kp / 32, 16, 32]
    stacked = 3 * n_rows <= amx_codes.STACKED_ROWS
    if stacked:
        xs = amx_codes.stack_parts(xs, n_rows)                               # [1, 2, Kp / 32, 16, 32]
    y = np.empty((n_rows, n_out), dtype=np.float32)                          # [N, out]
    longest = int(np.diff(seg_start).max())                                  # steps in the longest segment

    def make_scratch():
        return (np.empty((longest, 16, amx_codes.SLAB), dtype=np.uint32),    # code tiles [step, pair, j]
                np.empty((32, 32), dtype=np.float32),                        # C block
                np.empty((xs.shape[1] * 16, amx_codes.SLAB), dtype=np.float32),   # folded sums [Np, SLAB]
                np.empty((2, amx_codes.SLAB), dtype=np.float32))             # scales, zeros

    def work(j0, j1, *scratch):
        amx_codes.product_gathered(amx.CONFIG, amx_codes.TABLE, xs, sumx, n_rows, plan.qw, src, seg_start,
                                   seg_group, plan.scales, plan.qzeros, plan.zero_add, plan.const_zero, j0, j1,
                                   *scratch, y, stacked)
    _slabs_with_scratch(n_out, amx_codes.SLAB, make_scratch, work)
    return y


def _amx_codes_matmul(plan, xp):
    """Prefill of a 4-bit "segments" plan on AMX with the codes themselves as tiles (kernels/amx/amx_codes.py):
    xp [N, padded] split once (with the per-segment sums of x), slabs of amx_codes.SLAB columns spread over
    the threads like the BLAS slabs."""
    n_rows, n_out = xp.shape[0], plan.n_out
    xs = np.zeros((3, -(-n_rows // 32) * 2, xp.shape[1] // 32, 16, 32), dtype=np.uint16)   # x's parts, tiles
    sumx = np.empty((n_rows, len(plan.seg_group)), dtype=np.float32)         # [N, S]
    amx_codes.split_x_paired(xp, plan.seg_start, xs, sumx)
    stacked = 3 * n_rows <= amx_codes.STACKED_ROWS
    if stacked:
        xs = amx_codes.stack_parts(xs, n_rows)                               # [1, 2, padded / 32, 16, 32]
    y = np.empty((n_rows, n_out), dtype=np.float32)                          # [N, out]

    def make_scratch():
        return (amx_codes.aligned(2048),                                     # two code tiles
                np.empty((32, 32), dtype=np.float32),                        # one 32 x 32 block of C
                np.empty((32, amx_codes.SLAB), dtype=np.float32),            # its folded sums
                np.empty((2, amx_codes.SLAB), dtype=np.float32))             # scales, zeros

    def work(j0, j1, *scratch):
        amx_codes.product_codes(amx.CONFIG, amx_codes.TABLE, xs, sumx, n_rows, plan.qw, plan.seg_start,
                                plan.seg_group, plan.scales, plan.qzeros, plan.zero_add, plan.const_zero, j0, j1,
                                *scratch, y, stacked)
    _slabs_with_scratch(n_out, amx_codes.SLAB, make_scratch, work)
    return y


@njit(inline="always")
def _gather_row(x, gather, xp, r):
    n_in = x.shape[1]
    for t in range(gather.shape[0]):
        g = gather[t]
        xp[r, t] = x[r, g] if g < n_in else np.float32(0.0)


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def gather_columns(x, gather, xp):
    """xp[r, t] = x[r, gather[t]], or 0 where gather[t] == x.shape[1] (padding). prange over rows: a 512-row
    prefill permutes its activations on both cores (np.take ran on one: about 1 s of a 25 s 7B pp512)."""
    for r in prange(x.shape[0]):
        _gather_row(x, gather, xp, r)


@njit(error_model="numpy", cache=True, boundscheck=False)
def gather_rows(x, gather, xp):
    """gather_columns on this thread, for a few decode rows: waking the other threads costs more (a 7B decode
    step permutes 224 times; 10-200 us each through prange on a 2-core machine, 2-3 us here)."""
    for r in range(x.shape[0]):
        _gather_row(x, gather, xp, r)


def permute_x(plan, x):
    """x [N, in] -> xp [N, padded] in the plan's row order, zeros in padding rows."""
    if plan.perm is None:
        xp = np.zeros((x.shape[0], plan.n_padded), dtype=np.float32)         # [N, padded]
        xp[:, :plan.n_in] = x
        return xp
    # Padding rows point one past the last input (plan.gather, made once in prepare()).
    xp = np.empty((x.shape[0], plan.n_padded), dtype=np.float32)             # [N, padded]
    (gather_rows if x.shape[0] <= GEMV_MAX_ROWS else gather_columns)(x, plan.gather, xp)
    return xp


def gemv_block(n_out, unit=32, threads=None):
    """Output columns per GEMV task: GEMV_TASKS_PER_THREAD long blocks per thread (this process's threads unless
    given), a multiple of `unit` columns (32, so that every block starts on a whole qzeros word for any bit
    width; a plan's strip width where it is stored in strips: _block_unit)."""
    n_tasks = max(1, (threads or numba.get_num_threads()) * GEMV_TASKS_PER_THREAD)
    per_task = -(-n_out // n_tasks)                  # ceil
    return max(unit, -(-per_task // unit) * unit)


def decode_bounds(plan, threads):
    """The column bounds a decode GEMV's threads take in turn (generic/tasks.py): a guided schedule on a plan in
    strips, where a block of any width is one run of memory; one block per thread on a row-major plan, whose
    packed rows are read in runs as long as the block (guided blocks made split8 1.2x slower: 7B, vnni tier,
    2 threads, 10 alternating rounds)."""
    if plan.strip < plan.n_out:
        return tasks.guided(plan.n_out, plan.strip, threads)
    return tasks.uniform(plan.n_out, gemv_block(plan.n_out, 32, threads))


def _block_unit(plan):
    """Blocks of whole strips for a plan in strips (a 64-column strip is one run of memory), else 32."""
    return plan.strip if plan.strip < plan.n_out else 32


# -- the kernels as the table names them: run(name, plan, x) with x [N, in] float32 in input order -> y [N, out]

def _gemv(plan, x):
    xp = permute_x(plan, x)                                                  # [N, padded]
    y = np.empty((x.shape[0], plan.n_out), dtype=np.float32)           # [N, out]
    gemv(plan.qw, xp, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.bits, plan.zero_add,
         plan.const_zero, gemv_block(plan.n_out, _block_unit(plan)), y)
    return y


def _gemv_inplace(plan, x):
    """x stays in input order; per-group sums of x are made per call."""
    n_rows, n_out = x.shape[0], plan.n_out
    y = np.empty((n_rows, n_out), dtype=np.float32)                          # [N, out]
    # [N, padded] in rows one cache line longer, so that the rows do not share L1 sets (8192 inputs are
    # 32 KB: at 16 rows the GEMV ran 3-4x slower without it)
    xg = np.zeros((n_rows, plan.n_padded + 16), dtype=np.float32)[:, :plan.n_padded]
    xg[:, :plan.n_in] = x
    sumx = np.zeros((n_rows, plan.n_groups), dtype=np.float32)               # [N, G]
    for n in range(n_rows):
        sumx[n] = np.bincount(plan.g_idx[:plan.n_in], weights=x[n], minlength=plan.n_groups)
    gemv_inplace(plan.qw, xg, plan.g_idx, sumx, plan.scales, plan.qzeros, plan.bits, plan.zero_add,
                 plan.const_zero, plan.n_in, inplace_block(n_out, plan.n_groups), y)
    return y


def _blas_slabs(plan, x):
    return _slab_matmul(permute_x(plan, x), plan.n_out, lambda j0, j1, t: dequantize_slab(
        plan.qw, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.bits, plan.zero_add, j0, j1, t))


def _blas_slabs_inplace(plan, x):
    return _slab_matmul(x, plan.n_out, lambda j0, j1, t: dequantize_slab_inplace(
        plan.qw, plan.g_idx, plan.scales, plan.qzeros, plan.bits, plan.zero_add, plan.n_in, j0, j1, t))


def _split8(plan, x):
    return split8.gptq_matmul_split(plan, permute_x(plan, x), decode_bounds(plan, numba.get_num_threads()))


def _bind_gemv_avx2(plan, rows, threads):
    from .avx2 import gemv as gemv_avx2
    return gemv_avx2.bind(plan, rows, decode_bounds(plan, threads), threads)


def _gemv_avx2(plan, x):
    return _bind_gemv_avx2(plan, x.shape[0], numba.get_num_threads())(x)


def _int8_gemv(plan, x):
    from .vnni import int8
    y = np.empty((x.shape[0], plan.n_out), dtype=np.float32)           # [N, out]
    return int8.gptq_matmul_int8(plan, permute_x(plan, x), y, decode_bounds(plan, numba.get_num_threads()))


def _int8_gemv_avx2(plan, x):
    from .avx2 import int8 as int8_avx2
    y = np.empty((x.shape[0], plan.n_out), dtype=np.float32)           # [N, out]
    return int8_avx2.gptq_matmul_int8(plan, permute_x(plan, x), y, decode_bounds(plan, numba.get_num_threads()))


def _int8_gemm(plan, x):
    from .vnni import int8_gemm
    return int8_gemm.gptq_matmul_int8_gemm(plan, permute_x(plan, x))


def _int8_gemm_avx2(plan, x):
    from .avx2 import int8_gemm as int8_gemm_avx2
    return int8_gemm_avx2.gptq_matmul_int8_gemm(plan, permute_x(plan, x))


def _int8_repacked(plan, x):
    """A transient copy of the streamed layer sorted by group, for this call only, then int8 mode on it."""
    return gptq_matmul(repack_inplace(plan), x, "int8")


def _tiles_avx2(plan, x):
    from .avx2 import tiles as tiles_avx2
    return tiles_avx2.tiles_matmul(plan, x)


def _amx_codes(plan, x):
    return _amx_codes_matmul(plan, permute_x(plan, x))


def _amx_slabs(plan, x):
    return _amx_matmul(permute_x(plan, x), plan.n_out, lambda xs, j0, j1, tile, bv, y: amx.product_segments(
        amx.CONFIG, xs, plan.qw, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.bits,
        plan.zero_add, j0, j1, tile, bv, y))


def _amx_slabs_inplace(plan, x):
    return _amx_matmul(x, plan.n_out, lambda xs, j0, j1, tile, bv, widened, y: amx.product_inplace(
        amx.CONFIG, xs, plan.qw, plan.g_idx, plan.scales, plan.qzeros, plan.bits, plan.zero_add, plan.n_in,
        j0, j1, widened[0], widened[1], tile, bv, y),
        lambda: (np.empty((2, plan.n_groups, amx.SLAB), dtype=np.float32),))   # scales, zeros [G, SLAB]


RUN = {
    "gemv": _gemv, "gemv_inplace": _gemv_inplace, "blas_slabs": _blas_slabs,
    "blas_slabs_inplace": _blas_slabs_inplace, "split8": _split8, "gemv_avx2": _gemv_avx2,
    "tiles": _tiles_matmul, "tiles_inplace": _tiles_matmul, "tiles_avx2": _tiles_avx2,
    "tiles_avx2_inplace": _tiles_avx2, "int8_gemv": _int8_gemv, "int8_gemv_avx2": _int8_gemv_avx2,
    "int8_gemm": _int8_gemm, "int8_gemm_avx2": _int8_gemm_avx2, "int8_repacked": _int8_repacked,
    "amx_codes": _amx_codes, "amx_gathered": _amx_gathered_matmul, "amx_slabs": _amx_slabs,
    "amx_slabs_inplace": _amx_slabs_inplace,
}


# kernels whose work that does not depend on x can be done once per plan, row count and thread count:
# bind(plan, rows, threads) -> a function x -> y
BIND = {"gemv_avx2": _bind_gemv_avx2}


def _before(name, plan):
    if name not in table.kernels_reading(table.layer_of(plan).layout):
        raise ValueError(f"kernel {name} does not read the {table.layer_of(plan).layout} layout")
    compile_note.before_call(table.dispatchers(name), "GPTQ kernels")


def run(name, plan, x):
    """Run the kernel `name` of the table on x [N, in] float32 (C-contiguous) -> y [N, out] float32, saying so
    first if it is about to compile (compile_note.py). gptq_matmul chooses the name; tests and benchmarks may
    name one directly to compare kernels on the same layer."""
    _before(name, plan)
    return RUN[name](plan, x)


def bound_call(plan, rows, mode, threads):
    """The function x [rows, in] -> y [rows, out] that gptq_matmul runs for this plan, row count, mode and
    thread count: the table's kernel, bound once (BIND, or RUN with the plan) and kept in the plan. A 7B
    decode step makes 224 calls, each after a kernel that streamed megabytes of weights through the caches,
    so every Python step around a call runs from memory: choosing, checking and preparing once per plan took
    one token from 134 to 123 ms (2 threads, capped AVX2, 7B)."""
    calls = plan.__dict__.setdefault("_bound_calls", {})
    call = calls.get((rows, mode, threads))
    if call is None:
        name = table.choose(table.layer_of(plan), rows, mode, plan.tier)
        _before(name, plan)
        call = BIND[name](plan, rows, threads) if name in BIND else functools.partial(RUN[name], plan)
        calls[(rows, mode, threads)] = call
    return call


def gptq_matmul(plan, x, mode="exact"):
    """y = x @ W for x [N, in] float32 C-contiguous -> [N, out] float32 (no bias), on the kernel that
    kernels/table.py names for this layer, x.shape[0] rows, the mode and the plan's tier.

    mode "int8" (opt-in, approximate) rounds the activations to int8 per block of 32 where the table has an
    int8 kernel for the layer (4-bit decode rows; 3- and 4-bit prefill; streamed act-order layers are copied in
    group order for the call, repack_inplace); other layers stay exact."""
    if x.shape[0] > BOUND_MAX_ROWS:
        return run(table.choose(table.layer_of(plan), x.shape[0], mode, plan.tier), plan, x)
    return bound_call(plan, x.shape[0], mode, numba.get_num_threads())(x)
