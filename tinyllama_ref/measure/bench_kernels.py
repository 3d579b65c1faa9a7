"""GPTQ kernel benchmark on the Llama-2-70B layer shapes (`tinyllama-ref bench kernels`).

For each shape, bit width and group size (act-order, like every Meditron-70B GPTQ branch) a random layer is
built in memory and run through GPTQLinear's Numba backend:
  - decode (1 activation row): median time, GB/s of packed weights read (qweight + qzeros + scales), and the
    memory read bandwidth measured just before, in the same run (measure/bandwidth.py), with their ratio;
  - prefill (64 and 512 rows): GFLOP/s (2 * rows * in * out / time) next to float32 BLAS on the same shapes
    (x @ W with W a dense float32 [in, out]) measured in the same run, with their ratio.
The load-time preparation (act-order repack) is timed too. Modes: "exact" (the default float32 path) and, with
--modes exact,int8, the opt-in int8-activation decode with its accuracy (KL, top-1) next to its speed.
--layout picks the act-order layout: "repacked" (rows sorted by group at load, for resident layers), "inplace"
(prepare(..., repack=False): qweight read as stored, no load-time copy, for layers streamed from disk) or both;
every result names its layout.

    tinyllama-ref bench kernels                         # the full table (a few minutes)
    tinyllama-ref bench kernels --quick --json          # one shape, JSON lines
    tinyllama-ref bench kernels --layout both --shapes 8192x28672,28672x8192 --groups 128 --rows 1,8
"""

import argparse
import json
import os
import sys
import statistics
import time

import numpy as np

# The 70B layer shapes as (name, in, out): y = x @ W with W [in, out].
SHAPES_70B = [("q_proj/o_proj", 8192, 8192), ("k_proj/v_proj", 8192, 1024),
              ("gate_proj/up_proj", 8192, 28672), ("down_proj", 28672, 8192)]


def random_layer(rng, n_in, n_out, bits, group_size):
    """Random packed tensors with act-order g_idx (random bit patterns are valid codes for any width)."""
    from ..quant import QuantConfig, pack_zeros
    cfg = QuantConfig(bits=bits, group_size=group_size, desc_act=True, sym=True, source="bench")
    n_groups = cfg.n_groups(n_in)
    words = lambda *shape: rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.int32)   # noqa: E731
    qweight = words(-(-n_in * bits // 32), n_out)                            # [R, out]
    # Symmetric, as in every Meditron branch: all true zeros 2**(bits-1), stored minus one (AutoGPTQ v1).
    qzeros = pack_zeros(np.full((n_groups, n_out), 2 ** (bits - 1) - 1), bits)   # [G, Z]
    scales = rng.uniform(0.001, 0.02, size=(n_groups, n_out)).astype(np.float16)   # [G, out]
    order = rng.permutation(n_in)
    g_idx = np.empty(n_in, dtype=np.int32)                                   # [in]
    g_idx[order] = np.arange(n_in) // (n_in if group_size == -1 else group_size)
    return cfg, qweight, qzeros, scales, g_idx


def median_seconds(fn, repeats):
    fn()                                                                     # warm up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def blas_gflops(rng, n_in, n_out, rows, repeats):
    """float32 BLAS x [rows, in] @ W [in, out] in GFLOP/s (median)."""
    w = rng.standard_normal((n_in, n_out), dtype=np.float32)                # [in, out]
    x = rng.standard_normal((rows, n_in), dtype=np.float32)                 # [rows, in]
    seconds = median_seconds(lambda: x @ w, repeats)
    return 2.0 * rows * n_in * n_out / seconds / 1e9


def int8_model_accuracy(seed=0, sequences=32, length=4):
    """KL(exact || int8) and top-1 agreement of next-token distributions on a synthetic tiny 4-bit GPTQ
    model (tinyllama_ref.synth; random weights, act-order, group 32). Sequences of `length` <= 4 tokens so
    every matmul takes the decode path, where int8 mode applies."""
    import tempfile
    from .. import load
    from ..make.synth import synthesize
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        synthesize(d, preset="tiny", bits=4, group_size=32, act_order=True, seed=seed, quiet=True)
        model = load(d, backend="numba")
        ids = rng.integers(3, model.cfg.vocab_size, size=(sequences, length))
        exact = np.concatenate([model.logits(list(map(int, s))) for s in ids])     # [S * L, V]
        model = load(d, backend="numba", gptq_mode="int8")
        approx = np.concatenate([model.logits(list(map(int, s))) for s in ids])    # [S * L, V]
    log_p = exact - exact.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))                # [S * L, V]
    log_q = approx - approx.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
    top1 = float(np.mean(exact.argmax(axis=1) == approx.argmax(axis=1)))
    return {"model_kl": round(kl, 8), "model_top1_agreement": round(top1, 4), "model": "synthetic tiny 4-bit g32"}


def run(shapes, bits_list, groups, rows_list, repeats=9, prefill_repeats=3, seed=0, emit=print,
        modes=("exact",), layouts=("repacked",), kernel=None):
    """kernel: a name of kernels/table.py's KERNELS to time instead of the one the table chooses."""
    from ..kernels import gptq, table
    from .bandwidth import memory_read_gbps
    from ..quant import GPTQLinear
    rng = np.random.default_rng(seed)
    accuracy = int8_model_accuracy(seed) if "int8" in modes else {}
    blas_cache = {}
    results = []
    for name, n_in, n_out in shapes:
        for bits in bits_list:
            for group_size in groups:
                cfg, qweight, qzeros, scales, g_idx = random_layer(rng, n_in, n_out, bits, group_size)
                for layout in layouts:
                    layer = GPTQLinear(qweight, qzeros, scales, g_idx, cfg, n_in, n_out, backend="numba", name=name,
                                       repack=layout == "repacked")
                    packed = qweight.nbytes + qzeros.nbytes + scales.nbytes
                    plan_layout = table.layer_of(layer._plan).layout
                    if kernel and kernel not in table.kernels_reading(plan_layout):
                        print(f"{name} {bits}-bit g{group_size} {layout}: --kernel {kernel} does not read the "
                              f"{plan_layout} layout this layer has at the {layer.tier} tier; skipped", file=sys.stderr)
                        continue
                    for rows in rows_list:
                        x = rng.standard_normal((rows, n_in), dtype=np.float32)     # [rows, in]
                        mem = memory_read_gbps(256 * 2**20, repeats=5)
                        chosen = kernel or table.choose(table.layer_of(layer._plan), rows, "exact", layer.tier)
                        call = (lambda: gptq.run(kernel, layer._plan, x)) if kernel else (lambda: layer(x))
                        seconds = median_seconds(call, repeats if rows <= 4 else prefill_repeats)
                        r = {"mode": "exact", "name": name, "bits": bits, "group_size": group_size, "act_order": True,
                             "shape": [n_in, n_out], "rows": rows, "median_ms": round(seconds * 1e3, 3),
                             "weights_gbps": round(packed / seconds / 1e9, 2), "memory_gbps": round(mem, 2),
                             "ratio": round(packed / seconds / 1e9 / mem, 3),
                             "prepare_s": round(layer.prepare_seconds, 3), "layout": layout,
                             "tier": layer.tier, "kernel": chosen,
                             "plan": layer._plan.prepare_note,
                             "packed_mb": round(packed / 1e6, 1),
                             "loadavg_1min": round(os.getloadavg()[0], 2)}   # > 2 means others shared the cores
                        if rows > 4:
                            key = (n_in, n_out, rows)
                            if key not in blas_cache:
                                blas_cache[key] = blas_gflops(rng, n_in, n_out, rows, prefill_repeats)
                            gflops = 2.0 * rows * n_in * n_out / seconds / 1e9
                            r.update(gflops=round(gflops, 1), blas_gflops=round(blas_cache[key], 1),
                                     blas_ratio=round(gflops / blas_cache[key], 3))
                        results.append(r)
                        emit(r)
                        if "int8" in modes and bits == 4 and rows <= 4:
                            exact_y = layer(x)
                            layer.mode = "int8"
                            approx_y = layer(x)
                            q_seconds = median_seconds(lambda: layer(x), repeats)
                            layer.mode = "exact"
                            q = dict(r, mode="int8", median_ms=round(q_seconds * 1e3, 3),
                                     weights_gbps=round(packed / q_seconds / 1e9, 2),
                                     ratio=round(packed / q_seconds / 1e9 / mem, 3),
                                     layer_rel_err=float(np.abs(approx_y - exact_y).max() / np.abs(exact_y).max()),
                                     loadavg_1min=round(os.getloadavg()[0], 2))
                            q.update(accuracy)
                            results.append(q)
                            emit(q)
                    layer = None                  # free the repacked copy before the next layer
    return results


def markdown(results):
    """The results as a markdown table (decode rows first, then prefill)."""
    lines = ["| mode | layout | shape (in x out) | bits | group | rows | median ms | packed GB/s | memory GB/s | "
             "ratio | GFLOP/s | BLAS f32 GFLOP/s | ratio | prepare s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["rows"] > 4, r["shape"], -r["bits"], r["group_size"], r["rows"],
                                            r["mode"], r["layout"])):
        g = "none" if r["group_size"] == -1 else str(r["group_size"])
        pre = r.get("gflops")
        lines.append(f"| {r['mode']} | {r['layout']} | {r['shape'][0]} x {r['shape'][1]} | {r['bits']} | {g} | "
                     f"{r['rows']} | "
                     f"{r['median_ms']} | "
                     f"{r['weights_gbps']} | {r['memory_gbps']} | {r['ratio']:.2f} | "
                     f"{pre if pre is not None else ''} | {r.get('blas_gflops', '')} | "
                     f"{'' if pre is None else format(r['blas_ratio'], '.2f')} | {r['prepare_s']} | "
                     f"{r['loadavg_1min']} |")
    return "\n".join(lines)


def _int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tinyllama-ref bench kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=_int_list, default=[4, 3], help="comma list, default 4,3")
    parser.add_argument("--groups", type=_int_list, default=[128, -1], help="comma list, default 128,-1")
    parser.add_argument("--rows", type=_int_list, default=[1, 64, 512],
                        help="activation rows, comma list, default 1,64,512 (1 = decode GEMV)")
    parser.add_argument("--shapes", default="all",
                        help="'all' (the four 70B shapes) or a comma list of INxOUT, e.g. 8192x28672")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per decode figure (median)")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed runs per prefill figure")
    parser.add_argument("--modes", default="exact",
                        help="comma list: exact (default; float32, matches the reference) and/or int8 (opt-in, "
                             "approximate: int8 activations with VNNI, 4-bit decode rows only)")
    parser.add_argument("--layout", choices=("repacked", "inplace", "both"), default="repacked",
                        help="act-order layout: repacked at load (default; resident layers), inplace (no load-time "
                             "copy; streamed layers) or both")
    parser.add_argument("--quick", action="store_true", help="only the 8192x28672 shape, decode rows only")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    parser.add_argument("--cpu", default=None, metavar="TIER",
                        help="cap the kernels' CPU tier for this run (TINYLLAMA_CPU; docs/kernels.md)")
    parser.add_argument("--kernel", default=None, metavar="NAME",
                        help="time this kernel of kernels/table.py (exact mode) instead of the table's choice, "
                             "e.g. blas_slabs against tiles_avx2")
    args = parser.parse_args(argv)
    from ..kernels.cpu import cap_option
    cap_option(parser, args.cpu)
    if args.kernel is not None:
        from ..kernels import table
        if args.kernel not in table.KERNELS:
            parser.error(f"--kernel {args.kernel!r} is not a kernel of kernels/table.py: {', '.join(table.KERNELS)}")
    if args.shapes == "all":
        shapes = SHAPES_70B
    else:
        shapes = []
        for item in args.shapes.split(","):
            n_in, n_out = (int(v) for v in item.lower().split("x"))
            shapes.append((item, n_in, n_out))
    rows = args.rows
    if args.quick:
        shapes = [s for s in SHAPES_70B if s[2] == 28672]
        rows = [1]

    def emit(r):
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            extra = (f"  prefill {r['gflops']:.0f} GFLOP/s vs BLAS {r['blas_gflops']:.0f} ({r['blas_ratio']:.2f})"
                     if "gflops" in r else "")
            if r["mode"] != "exact":
                extra += (f"  [{r['mode']}: layer rel err {r['layer_rel_err']:.1e}, model KL {r['model_kl']:.2e}, "
                          f"top-1 {r['model_top1_agreement']:.3f}]")
            print(f"{r['mode']:>5} {r.get('tier', '')}:{r.get('kernel', '')} {r['layout']:>8} "
                  f"{r['shape'][0]:>5} x {r['shape'][1]:<5} {r['bits']}-bit "
                  f"g{r['group_size']:<4} rows {r['rows']:<3} "
                  f"{r['median_ms']:8.2f} ms  {r['weights_gbps']:6.1f} GB/s packed  memory {r['memory_gbps']:5.1f} "
                  f"GB/s  ratio {r['ratio']:.2f}  prepare {r['prepare_s']:.2f}s{extra}", flush=True)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "int8" in modes:
        from ..quant import check_gptq_mode
        check_gptq_mode("int8")              # validates the CPU; layers are switched one at a time below
    layouts = ("repacked", "inplace") if args.layout == "both" else (args.layout,)
    results = run(shapes, args.bits, args.groups, rows, args.repeats, args.prefill_repeats, emit=emit,
                  modes=modes, layouts=layouts, kernel=args.kernel)
    if args.markdown:
        print(markdown(results))
    return results


if __name__ == "__main__":
    main()
