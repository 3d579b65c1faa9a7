"""A GPTQ writer for tests, written from docs/formats.md alone (not from tinyllama_ref/quant.py).

docs/formats.md, "Packing": each column of qweight (and each row of qzeros) is one little-endian bit stream of
32-bit words, value t starting at bit bits * t. So this packer literally builds that stream: it spells every
code out as `bits` binary digits, least significant first, concatenates them, pads with zeros to whole words
and reads each run of 32 digits back as an unsigned integer. No shifts-into-words arithmetic is shared with
the code under test.

make_layer() turns known integer codes, scales and zeros into the tensors a checkpoint would hold, and
computes the expected W [in, out] straight from the definition W[i, j] = s[g, j] * (q[i, j] - zero[g, j]).
"""

import numpy as np


def bit_stream(values, bits):
    """The digits of `values` (1-D ints) as one stream, least significant digit of value 0 first."""
    values = np.asarray(values, dtype=np.int64)
    digits = (values[:, None] >> np.arange(bits)) & 1        # [n, bits]
    return digits.reshape(-1)                                 # [n * bits]


def words_from_stream(stream):
    """Cut a 0/1 stream into little-endian 32-bit words (zero padded), returned as int32 bit patterns."""
    n_words = -(-len(stream) // 32)
    padded = np.zeros(n_words * 32, dtype=np.int64)
    padded[:len(stream)] = stream
    chunks = padded.reshape(n_words, 32)                      # [words, 32]
    value = (chunks * (2 ** np.arange(32, dtype=np.int64))).sum(axis=1)   # [words] as unsigned
    return value.astype(np.uint32).view(np.int32)


def pack_stream_columns(codes, bits):
    """codes [n, m] -> words [ceil(n * bits / 32), m]: each column is one bit stream."""
    return np.stack([words_from_stream(bit_stream(codes[:, j], bits)) for j in range(codes.shape[1])], axis=1)


def pack_stream_rows(codes, bits):
    """codes [G, m] -> words [G, ceil(m * bits / 32)]: each row is one bit stream (the qzeros layout)."""
    return np.stack([words_from_stream(bit_stream(codes[g], bits)) for g in range(codes.shape[0])], axis=0)


def act_order_g_idx(rng, n_in, group_size):
    """g_idx as GPTQ with desc_act writes it: inputs visited in a permuted order, groups cut along it."""
    perm = rng.permutation(n_in)
    g_idx = np.empty(n_in, dtype=np.int32)
    g_idx[perm] = np.arange(n_in) // group_size
    return g_idx


def make_layer(rng, n_in, n_out, bits, group_size, act_order=False, sym=True, checkpoint_format="gptq",
               g_idx=None, bias=False):
    """A random GPTQ layer: returns dict(qweight, qzeros, scales, g_idx, bias, W, codes, zeros)."""
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    top = 2 ** bits - 1
    codes = rng.integers(0, top + 1, size=(n_in, n_out))                         # [in, out]
    if sym:
        zeros = np.full((n_groups, n_out), 2 ** (bits - 1))                     # [G, out] true zero
    else:
        zeros = rng.integers(0, top + 1, size=(n_groups, n_out))                # [G, out], 0 and top included
    scales = (rng.uniform(0.002, 0.05, size=(n_groups, n_out))
              * rng.choice([-1.0, 1.0], size=(n_groups, n_out))).astype(np.float16)   # [G, out]
    if g_idx is None:
        if act_order and group_size != -1:
            g_idx = act_order_g_idx(rng, n_in, group_size)
        else:
            g = n_in if group_size == -1 else group_size
            g_idx = (np.arange(n_in) // g).astype(np.int32)
    g_idx = np.asarray(g_idx, dtype=np.int32)
    # AutoGPTQ ("gptq", v1) stores zero - 1, wrapped to `bits`; GPTQModel's "gptq_v2" stores the zero itself.
    stored = (zeros - 1) % (top + 1) if checkpoint_format == "gptq" else zeros
    W = (scales.astype(np.float32)[g_idx]
         * (codes.astype(np.float32) - zeros[g_idx].astype(np.float32)))       # [in, out]
    b = rng.normal(size=n_out).astype(np.float16) if bias else None
    return dict(qweight=pack_stream_columns(codes, bits), qzeros=pack_stream_rows(stored, bits),
                scales=scales, g_idx=g_idx, bias=b, W=W, codes=codes, zeros=zeros, stored_zeros=stored)


def quantize_config(bits, group_size, act_order=False, sym=True, checkpoint_format="gptq"):
    """The quantize_config.json dict AutoGPTQ writes."""
    return {"bits": bits, "group_size": group_size, "damp_percent": 0.1, "desc_act": act_order, "sym": sym,
            "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
            "quant_method": "gptq", "checkpoint_format": checkpoint_format}


def write_safetensors(path, tensors, metadata=None):
    """A minimal safetensors writer from the format description (8-byte header length, JSON, data)."""
    import json
    import struct
    names = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def write_gptq_checkpoint(out_dir, tensors, hf_config, qc):
    """TheBloke's layout: one model.safetensors, config.json with quantization_config, quantize_config.json."""
    import json
    import os
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, metadata={"format": "pt"})
    hf_config = dict(hf_config, quantization_config=qc, torch_dtype="float16")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "quantize_config.json"), "w") as f:
        json.dump(qc, f, indent=2)
    return out_dir
