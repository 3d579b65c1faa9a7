"""`bench int8-accuracy`: what the opt-in `gptq_mode="int8"` costs in accuracy, next to the speed rows of
`bench generate --gptq-mode int8`.

For one checkpoint (or a synthetic tiny one, --tiny), on the numba backend:
  - per-layer relative error: every GPTQ matmul of a teacher-forced prompt is run both ways on the same input,
    ||y_int8 - y_exact|| / ||y_exact|| (Frobenius, over the prompt's rows), reported per matmul kind
    (q, k, v, o, gate, up, down) as the median and the worst over the layers;
  - KL(exact || int8) and top-1 agreement of the next-token distributions at every position of prompts of
    each --tokens length (prefill passes, so the int8 GEMM of kernels/vnni/int8_gemm.py runs);
  - perplexity of generated text under both modes: text sampled from the exact model itself (temperature 1,
    fixed seed), so the exact perplexity is the model's own and the int8 one says how far it moves.

    tinyllama-ref bench int8-accuracy CKPT --tokens 64,512 --generate 128 --json
    tinyllama-ref bench int8-accuracy --tiny
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def set_gptq_mode(model, mode):
    """Switch every GPTQ layer of a loaded model (resident ones now, streamed ones when next built)."""
    from ..weights import LINEARS
    model.layers.gptq_mode = mode
    for weights in model.layers.resident.values():
        for name in LINEARS:
            linear = getattr(weights, name)
            if hasattr(linear, "mode"):
                linear.mode = mode


def log_softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)                         # [T, V]
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(exact, approx):
    """Mean KL(exact || approx) over positions and top-1 agreement, for logits [T, V] each."""
    log_p, log_q = log_softmax(exact.astype(np.float64)), log_softmax(approx.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top1 = float(np.mean(exact.argmax(axis=-1) == approx.argmax(axis=-1)))
    return kl, top1


def perplexity_of(logits, ids):
    """exp(mean negative log-likelihood of ids[1:] given the logits [len(ids), V] of each prefix)."""
    lp = log_softmax(logits[:-1].astype(np.float64))                         # [T - 1, V]
    return float(np.exp(-np.mean(lp[np.arange(len(ids) - 1), ids[1:]])))


def layer_errors(model, ids):
    """{kind: [relative error per layer]} for one teacher-forced pass, each matmul run exactly and in int8
    on the same input (the exact result is what the pass carries on with)."""
    from ..quant import GPTQLinear
    errors = {kind: [] for kind in KINDS}
    plain = GPTQLinear.__call__

    def both(self, x):
        self.mode = "exact"
        y = plain(self, x)
        self.mode = "int8"
        y8 = plain(self, x)
        self.mode = "exact"
        kind = self.name.rsplit(".", 1)[-1]
        if kind in errors:
            errors[kind].append(float(np.linalg.norm(y8 - y) / max(np.linalg.norm(y), 1e-30)))
        return y
    GPTQLinear.__call__ = both
    try:
        model.logits(ids)
    finally:
        GPTQLinear.__call__ = plain
    return errors


def measure(checkpoint, tokens=(64, 512), generate=128, seed=0, max_memory=None):
    from .. import load
    from ..quant import check_gptq_mode
    check_gptq_mode("int8")
    model = load(checkpoint, backend="numba", max_memory=max_memory)
    rng = np.random.default_rng(seed)
    vocab, context = model.cfg.vocab_size, model.cfg.max_seq_len
    lengths = [min(t, context) for t in tokens]
    record = {"checkpoint": checkpoint, "n_layers": model.cfg.n_layers, "hidden": model.cfg.dim,
              "bits": model.quant_config.bits if model.quant_config else None,
              "group_size": model.quant_config.group_size if model.quant_config else None, "prompts": []}
    t0 = time.perf_counter()
    probe = [int(v) for v in rng.integers(3, vocab, size=min(max(lengths), 64))]
    errs = layer_errors(model, probe)
    record["layer_error"] = {k: {"median": round(float(np.median(v)), 6), "max": round(float(np.max(v)), 6),
                                 "layers": len(v)} for k, v in errs.items() if v}
    for n in lengths:
        ids = [int(v) for v in rng.integers(3, vocab, size=n)]
        set_gptq_mode(model, "exact")
        exact = model.logits(ids)
        set_gptq_mode(model, "int8")
        approx = model.logits(ids)
        kl, top1 = compare_logits(exact, approx)
        record["prompts"].append({"tokens": n, "kl": round(kl, 8), "top1_agreement": round(top1, 4)})
    if generate:
        set_gptq_mode(model, "exact")
        start = [int(model.cfg.bos_token_id)]
        n_new = min(generate, context - 1)
        text = start + [int(t) for t in model.generate(start, max_new_tokens=n_new, temperature=1.0, seed=seed)]
        ppl_exact = perplexity_of(model.logits(text), np.array(text))
        set_gptq_mode(model, "int8")
        ppl_int8 = perplexity_of(model.logits(text), np.array(text))
        record["generated"] = {"tokens": len(text), "perplexity_exact": round(ppl_exact, 4),
                               "perplexity_int8": round(ppl_int8, 4),
                               "relative_change": round(ppl_int8 / ppl_exact - 1.0, 6)}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def format_record(rec):
    lines = [f"int8 vs exact on {rec['checkpoint']} ({rec['n_layers']} layers, hidden {rec['hidden']}, "
             f"{rec['bits']}-bit g{rec['group_size']})", "",
             "| matmul | relative error, median over layers | worst layer |", "|---|---|---|"]
    for kind, e in rec["layer_error"].items():
        lines.append(f"| {kind} | {e['median']:.2e} | {e['max']:.2e} |")
    lines += ["", "| prompt tokens | KL(exact, int8) nats/token | top-1 agreement |", "|---|---|---|"]
    for p in rec["prompts"]:
        lines.append(f"| {p['tokens']} | {p['kl']:.2e} | {p['top1_agreement']:.4f} |")
    if "generated" in rec:
        g = rec["generated"]
        lines += ["", f"perplexity of {g['tokens']} tokens the exact model sampled: exact {g['perplexity_exact']:.4g}, "
                      f"int8 {g['perplexity_int8']:.4g} ({100 * g['relative_change']:+.3f}%)"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tinyllama-ref bench int8-accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a GPTQ checkpoint directory (omit with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a synthetic tiny 4-bit g32 act-order model instead")
    ap.add_argument("--tokens", default="64,512", help="prompt lengths for KL / top-1 (default 64,512)")
    ap.add_argument("--generate", type=int, default=128, help="tokens to sample for the perplexity row (0: none)")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if (a.checkpoint is None) == (not a.tiny):
        ap.error("give a checkpoint directory or --tiny (one of them)")
    try:
        tokens = tuple(int(t) for t in a.tokens.split(",") if t.strip())
    except ValueError:
        ap.error(f"--tokens must be comma-separated numbers, got {a.tokens!r}")
    if not tokens or min(tokens) < 2:
        ap.error("--tokens: every prompt needs at least 2 tokens")
    with tempfile.TemporaryDirectory() as tmp:
        path = a.checkpoint
        if a.tiny:
            from ..make.synth import synthesize
            path = os.path.join(tmp, "tiny")
            synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, seed=a.seed, quiet=True)
        rec = measure(path, tokens, a.generate, a.seed, a.max_memory)
    print(json.dumps(rec) if a.json else format_record(rec))


if __name__ == "__main__":
    main()
