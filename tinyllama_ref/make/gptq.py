"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") for one linear layer, in NumPy, written to be read.

The problem. A linear layer y = x @ W.T (W [out, in], the Hugging Face layout) sees calibration inputs X [n, in].
We want integer codes Q on a small grid with the output error ||X (W - Q).T||^2 as small as possible. Every
output row of W is quantized independently with the same objective, whose curvature is the Hessian

    H = 2/n * X.T @ X                                                      [in, in]

The idea (Optimal Brain Quantization, done column by column): quantize input column i of every row at once;
the rounding error of that column is then pushed onto the columns not yet quantized, weighted by how strongly
they are correlated with column i under H, so the output barely moves. With U the upper Cholesky factor of
H^-1 (H^-1 = U.T @ U), the update after quantizing column i is

    err        = (W[:, i] - Q[:, i]) / U[i, i]                             [out]
    W[:, i:]  -= outer(err, U[i, i:])                                      [out, in - i]

Using the Cholesky factor instead of re-inverting H after every column is what makes GPTQ fast and stable.
Columns are processed in blocks of 128: inside a block the update is applied column by column, the rest of the
matrix receives the whole block's accumulated errors in one matrix product ("lazy batch updates").

Refinements, all in AutoGPTQ's quantization/gptq.py too:
  - dampening: H += damp_percent * mean(diag(H)) * I keeps the Cholesky factorisation well conditioned;
  - dead inputs (H_ii == 0: never active in the calibration data) get H_ii = 1 and a zero weight;
  - act-order (desc_act): visit columns by decreasing H_ii, so the inputs that matter most are quantized first
    while many columns are still free to absorb their error;
  - groups: every `group_size` columns (along the visiting order) get their own scale and zero per output row,
    chosen when the group's first column is reached, from the weights as updated so far.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import QuantError

BLOCK_SIZE = 128


# -- the quantization grid ----------------------------------------------------------------------------------

def grid_params(w, bits, sym):
    """Per-row scale and zero code for the values w [out, n] (AutoGPTQ's Quantizer.find_params, per channel).

    asym: the grid spans [min(w, 0), max(w, 0)]; scale = (max - min) / maxq, zero = round(-min / scale).
    sym:  the grid is centred: max = max(|min|, max), min = -max, zero = (maxq + 1) / 2.
    The scale is rounded to float16 here, because float16 is what the checkpoint stores: the error feedback
    then accounts for the grid the model will really use, and loading reproduces the quantized weights exactly.
    """
    maxq = 2 ** bits - 1
    lo = np.minimum(w.min(axis=1), 0.0)                                   # [out]
    hi = np.maximum(w.max(axis=1), 0.0)                                   # [out]
    if sym:
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)                                          # an all-zero row: any grid will do
    lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
    scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)      # [out] as stored
    if not np.all(np.isfinite(scale)):
        raise QuantError(f"a weight of magnitude {float(np.max(np.abs(w))):.3g} needs a scale beyond float16's "
                         "range (65504); this checkpoint cannot be stored as GPTQ with float16 scales")
    scale = np.maximum(scale, 2.0 ** -24)   # tiny rows: float16's smallest step rather than a zero scale
    if sym:
        zero = np.full_like(scale, (maxq + 1) // 2)                       # [out]
    else:
        zero = np.clip(np.round(-lo / scale), 0, maxq)                    # [out]
    return scale, zero


def quantize_codes(w, scale, zero, bits):
    """Integer codes of w [out] (or [out, n] with scale/zero [out, 1]) on the grid: round, shift, clamp."""
    return np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize_codes(q, scale, zero):
    return scale * (q - zero)


# -- the Hessian --------------------------------------------------------------------------------------------

def hessian(x_chunks):
    """H = 2/n * sum over all calibration rows of x x^T, from an iterable of row blocks x [rows, in].

    Accumulated in float64 block by block, so calibration activations never need to sit in one array.
    """
    H, n = None, 0
    for x in x_chunks:
        x = np.asarray(x, dtype=np.float64)                               # [rows, in]
        H = x.T @ x if H is None else H + x.T @ x                         # [in, in]
        n += x.shape[0]
    if H is None or n == 0:
        raise QuantError("GPTQ needs calibration data: no activation rows were seen")
    return 2.0 * H / n                                                    # [in, in]


def inverse_hessian_factor(H, damp_percent):
    """The upper Cholesky factor U of (H + damp I)^-1, so that (H + damp I)^-1 = U.T @ U.

    np.linalg.cholesky returns the lower factor L of a matrix A = L @ L.T; the upper factor of A^-1 is the
    transpose of the lower factor of A^-1.
    """
    H = H.copy()
    damp = damp_percent * np.mean(np.diag(H))
    H[np.diag_indices_from(H)] += damp
    try:
        L = np.linalg.cholesky(H)                                         # [in, in] lower
    except np.linalg.LinAlgError:
        raise QuantError(f"the Hessian is not positive definite even after dampening by {damp_percent:g} of "
                         "its mean diagonal; use a larger --damp-percent or more calibration text") from None
    L_inv = np.linalg.inv(L)                                              # [in, in] lower
    H_inv = L_inv.T @ L_inv                                               # [in, in] = H^-1
    return np.linalg.cholesky(H_inv).T                                    # [in, in] upper


# -- GPTQ for one layer -------------------------------------------------------------------------------------

@dataclass
class GPTQResult:
    """The quantized layer, ready to pack. Rows of `codes` are in the ORIGINAL input order."""
    codes: np.ndarray      # [in, out] int32 in [0, 2**bits)   (GPTQ's qweight layout before packing)
    scales: np.ndarray     # [G, out] float16
    zeros: np.ndarray      # [G, out] int32, the TRUE zero codes (the "gptq" v1 file stores zero - 1)
    g_idx: np.ndarray      # [in] int32: the group of every input
    perm: np.ndarray       # [in] the visiting order (identity without act-order)
    loss: float            # sum over columns of the OBQ loss (w - q)^2 / U_ii^2 / 2: the proxy GPTQ minimises

    def dequantize(self):
        """W [out, in] float64 as the checkpoint will decode it (HF layout)."""
        s = self.scales.astype(np.float64)[self.g_idx]                    # [in, out]
        return (s * (self.codes - self.zeros[self.g_idx])).T              # [out, in]


def gptq_quantize(weight, H, bits=4, group_size=128, sym=True, act_order=False, damp_percent=0.01,
                  block_size=BLOCK_SIZE):
    """Quantize one linear layer's weight [out, in] (HF layout) given its Hessian H [in, in] -> GPTQResult."""
    if bits not in (2, 3, 4, 8):
        raise QuantError(f"bits must be 2, 3, 4 or 8, got {bits}")
    W = np.array(weight, dtype=np.float64)                                # [out, in] a working copy
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise QuantError(f"Hessian has shape {H.shape}, expected [{in_f}, {in_f}] for a weight [{out_f}, {in_f}]")
    if group_size != -1 and group_size <= 0:
        raise QuantError(f"group_size must be -1 or positive, got {group_size}")
    maxq = 2 ** bits - 1
    H = np.array(H, dtype=np.float64)

    dead = np.diag(H) == 0                                                # inputs never seen active
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(in_f)   # [in]
    W = W[:, perm]                                                        # [out, in] in visiting order
    H = H[perm][:, perm]                                                  # [in, in]
    U = inverse_hessian_factor(H, damp_percent)                           # [in, in] upper

    group = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // group)
    codes = np.zeros((out_f, in_f), dtype=np.int64)                       # [out, in] visiting order
    scales = np.zeros((n_groups, out_f))                                  # [G, out]
    zeros = np.zeros((n_groups, out_f))                                   # [G, out]
    loss = 0.0
    scale = zero = None
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        Wb = W[:, b0:b1].copy()                                           # [out, B] updated column by column
        Ub = U[b0:b1, b0:b1]                                              # [B, B]
        errors = np.zeros_like(Wb)                                        # [out, B] scaled errors of the block
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                # The group's grid comes from its columns as they are NOW: those inside this block already carry
                # the feedback of this block's earlier columns (AutoGPTQ reads the not-yet-updated W for them);
                # a group running past the block reads W there, updated up to the previous block.
                inside = Wb[:, i:i + group]                               # [out, <= group] this block
                later = W[:, b1:b1 + group - inside.shape[1]]             # [out, rest of the group]
                upcoming = np.concatenate([inside, later], axis=1)        # [out, <= group]
                scale, zero = grid_params(upcoming, bits, sym)            # [out] each
                scales[col // group], zeros[col // group] = scale, zero
            w = Wb[:, i]                                                  # [out]
            q = quantize_codes(w, scale, zero, bits)                      # [out]
            codes[:, col] = q
            err = (w - dequantize_codes(q, scale, zero)) / Ub[i, i]       # [out]
            loss += float(np.sum(err ** 2)) / 2
            Wb[:, i:] -= np.outer(err, Ub[i, i:])                         # [out, B - i] feedback inside block
            errors[:, i] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]                               # [out, in - b1] the lazy batch update

    inverse = np.argsort(perm)                                            # visiting position of each input
    g_idx = (inverse // group).astype(np.int32)                           # [in] original order
    codes = codes[:, inverse]                                             # [out, in] original order
    if codes.min() < 0 or codes.max() > maxq:
        raise QuantError("internal error: a code fell outside the grid")
    return GPTQResult(codes=np.ascontiguousarray(codes.T).astype(np.int32),
                      scales=scales.astype(np.float16), zeros=zeros.astype(np.int32), g_idx=g_idx,
                      perm=perm.astype(np.int64), loss=loss)

