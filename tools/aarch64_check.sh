#!/usr/bin/env bash
# The aarch64 check: this commit's generic code paths on arm64 Linux, under emulation (qemu-user-static).
#
#   tools/aarch64_check.sh [ROOT]        ROOT: the arm64 Debian root to build or reuse (default /tmp/arm64-root)
#
# Builds (once) an arm64 Debian bookworm root with `debootstrap --foreign` and its second stage run through
# qemu-user-static (binfmt_misc registered by hand where the host has not), with Debian's Python 3.11 and a
# venv in it; copies this repository's HEAD commit (git archive: not the work tree) into it and installs it
# with `pip install -e .` (aarch64 wheels of numpy, numba, safetensors and sentencepiece come from PyPI).
# Then, under emulation:
#   - synth: a tiny 4-bit and 3-bit act-order GPTQ checkpoint and a dense fp16 one;
#   - generate --temperature 0 --json, --backend numpy and --backend numba, a short and a long (> 32 tokens)
#     prompt on each checkpoint: the same greedy ids;
#   - logits of both backends within 1e-5 (the API, teacher-forced on both prompts);
#   - a streamed run under a small max_memory (a 16-layer tiny model, some layers streamed): the same
#     logits and greedy ids as the resident numpy run;
#   - the kernel tests that apply to the generic tier (tests/test_kernels_*.py and test_cpu_tiers.py; the x86
#     tiers' tests must skip themselves there).
# Prints a summary and the elapsed time; exits non-zero on any mismatch or failure. Run it as root (chroot,
# mount, binfmt_misc) and niced: `nice -n 19 tools/aarch64_check.sh`. It needs Debian's mirror and PyPI.
# Environment: MIRROR (default: the host's first Debian mirror from its apt sources), SUITE (bookworm),
# KEEP_MOUNTS=1 leaves /proc, /sys and /dev mounted in ROOT afterwards.
set -euo pipefail

ROOT=${1:-/tmp/arm64-root}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${SUITE:-bookworm}
START=$(date +%s)
COMMIT=$(git -C "$REPO" rev-parse --short=7 HEAD)     # the commit checked: pinned now, the tree may move on
log() { echo "[aarch64 $(( $(date +%s) - START ))s] $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "tools/aarch64_check.sh: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }

# -- host tools ---------------------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
    log "installing qemu-user-static, debootstrap, binfmt-support"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support >/dev/null
fi

# -- binfmt_misc: arm64 ELF files run through qemu-aarch64-static ------------------------------------------
# In a container binfmt-support's service does not start; mount the file system and register by hand. The F
# flag (fix binary) makes the kernel open the interpreter now, so it works inside the chroot as well.
if [ "$(uname -m)" != aarch64 ]; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        log "registering qemu-aarch64 with binfmt_misc"
        printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:FP' \
            > /proc/sys/fs/binfmt_misc/register
    fi
fi

# -- the arm64 root -----------------------------------------------------------------------------------------
mirror() {
    if [ -n "${MIRROR:-}" ]; then echo "$MIRROR"; return; fi
    # The mirror this host's apt already uses (deb822 sources first, then the one-line format).
    local m
    m=$(grep -h -m1 '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
    [ -n "$m" ] || m=$(grep -h -m1 '^deb ' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
    echo "$m"
}

mounted=()
cleanup() {
    [ "${KEEP_MOUNTS:-0}" = 1 ] && return
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_into_root() {
    for d in proc sys dev; do
        if ! mountpoint -q "$ROOT/$d"; then
            case $d in proc) mount -t proc proc "$ROOT/proc" ;; *) mount --rbind "/$d" "$ROOT/$d" ;; esac
            mounted+=("$ROOT/$d")
        fi
    done
}
# pip in the root trusts what this host trusts (a registry proxy's certificate authority among them).
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
in_root() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

if [ ! -e "$ROOT/.aarch64-debootstrap-done" ]; then
    M=$(mirror)
    [ -n "$M" ] || { echo "no Debian mirror found in /etc/apt; set MIRROR" >&2; exit 2; }
    log "debootstrap --foreign --arch=arm64 $SUITE into $ROOT"
    rm -rf "$ROOT"
    debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$M" > "$ROOT.debootstrap.log" 2>&1 \
        || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"     # for kernels whose binfmt entry lacks the F flag
    log "debootstrap second stage (under emulation)"
    chroot "$ROOT" /debootstrap/debootstrap --second-stage >> "$ROOT.debootstrap.log" 2>&1 \
        || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
    touch "$ROOT/.aarch64-debootstrap-done"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp "$HOST_CA" "$ROOT/etc/ssl/certs/host-ca.crt"
if [ ! -e "$ROOT/.aarch64-root-ready" ]; then
    mount_into_root
    log "venv with Debian's $(in_root /usr/bin/python3 --version)"
    in_root /usr/bin/python3 -m venv /opt/venv
    in_root /opt/venv/bin/pip install -q --upgrade pip setuptools wheel pytest
    touch "$ROOT/.aarch64-root-ready"
fi
BOOTSTRAPPED=$(( $(date +%s) - START ))
mount_into_root
[ "$(in_root uname -m)" = aarch64 ] || { echo "the root does not run as aarch64" >&2; exit 1; }

# -- this commit, installed in the root ---------------------------------------------------------------------
log "installing $COMMIT (pip install -e .)"
rm -rf "$ROOT/opt/tinyllama-ref" "$ROOT/tmp/aarch64-check"
mkdir -p "$ROOT/opt/tinyllama-ref" "$ROOT/tmp/aarch64-check"
git -C "$REPO" archive "$COMMIT" | tar -x -C "$ROOT/opt/tinyllama-ref"
in_root /bin/sh -c 'cd /opt/tinyllama-ref && pip install -q -e .' > "$ROOT/tmp/aarch64-check/pip.log" 2>&1 \
    || { tail -20 "$ROOT/tmp/aarch64-check/pip.log"; exit 1; }
INSTALLED=$(( $(date +%s) - START ))
VERSIONS=$(in_root python -c 'import platform, numpy, numba, llvmlite; print(f"Python {platform.python_version()} on {platform.machine()}, numpy {numpy.__version__}, numba {numba.__version__}, llvmlite {llvmlite.__version__}")')
log "$VERSIONS"

# -- the checks, run inside the root ------------------------------------------------------------------------
cat > "$ROOT/tmp/aarch64-check/check.py" <<'EOF'
"""Inside the arm64 root: synth, generate with both backends, logits, a streamed run. One line per check."""
import json
import subprocess
import sys
import time

import numpy as np

import tinyllama_ref
from tinyllama_ref.memory import current_rss
from tinyllama_ref.streaming import JIT_RESERVE, SAFETY, SAFETY_FRACTION

SHORT = "Aspirin is"
LONG = ("Gout is a form of inflammatory arthritis that develops in some people who have high levels of uric "
        "acid in the blood. The acid can form needle-like crystals in a joint and cause sudden, severe "
        "episodes of pain, tenderness, warmth and swelling.")
CKPTS = {"gptq4": ["--bits", "4", "--group-size", "32", "--act-order"],
         "gptq3": ["--bits", "3", "--group-size", "32", "--act-order"],
         "dense": ["--dense", "fp16"]}
failures = []


def report(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def cli(*args):
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "tinyllama_ref", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"tinyllama_ref {' '.join(args)} failed:\n{p.stderr}")
    return p.stdout, time.time() - t


for name, flags in CKPTS.items():
    cli("synth", "-q", name, "--preset", "tiny", *flags)
cli("synth", "-q", "deep", "--preset", "tiny", "--layers", "16", *CKPTS["gptq4"])
tok = tinyllama_ref.load("gptq4", backend="numpy").tokenizer
n_long = len(tok.encode(LONG))
report(n_long > 32, f"the long prompt has {n_long} tokens (> 32)")

# generate: greedy ids of both backends, each prompt, each checkpoint
for name in CKPTS:
    for label, prompt in (("short", SHORT), ("long", LONG)):
        ids, secs = {}, {}
        for backend in ("numpy", "numba"):
            out, secs[backend] = cli("generate", name, "--prompt", prompt, "-n", "8", "--temperature", "0",
                                     "--json", "--backend", backend, "-q")
            ids[backend] = json.loads(out)["token_ids"]
        report(ids["numpy"] == ids["numba"] and len(ids["numpy"]) == 8,
               f"generate {name} {label}: numpy {ids['numpy']} numba {ids['numba']} "
               f"({secs['numpy']:.0f} s, {secs['numba']:.0f} s)")

# logits of both backends, teacher-forced on both prompts
prompts = [tok.encode(SHORT), tok.encode(LONG)]
for name in list(CKPTS) + ["deep"]:
    ref = tinyllama_ref.load(name, backend="numpy")
    fast = tinyllama_ref.load(name, backend="numba")
    for ids in prompts:
        a, b = ref.model.logits(ids), fast.model.logits(ids)
        diff = float(np.max(np.abs(a - b)))
        report(diff <= 1e-5, f"logits {name} {len(ids)} tokens: max |numpy - numba| = {diff:.2e} (<= 1e-5)")

# a streamed run: a budget with room for the streaming window and half of the layers, not all of them
for backend in ("numpy", "numba"):
    ref = tinyllama_ref.load("deep", backend="numpy")
    want_logits = ref.model.logits(prompts[1])
    want_ids = ref.model.generate([prompts[1]], max_new_tokens=8, stop_ids=[])
    probe = tinyllama_ref.load("deep", backend=backend)     # this backend's head, temporaries, activations
    probe.model.logits(prompts[1])
    src, c = probe.model.layers, probe.model.cfg
    kv = 2 * c.n_layers * len(prompts[1]) * c.n_kv_heads * c.head_dim * 4       # what logits() reserves
    need = (src.head_bytes + (JIT_RESERVE if backend == "numba" else 0) + src.scratch + SAFETY
            + kv + src.reserved.get("activations", 0) + src.window_bytes() + sum(src.file_bytes) // 2)
    budget = int((current_rss() + need) / (1 - SAFETY_FRACTION))
    m = tinyllama_ref.load("deep", backend=backend, max_memory=budget)
    layers = m.model.layers
    logits = m.model.logits(prompts[1])
    ids = m.model.generate([prompts[1]], max_new_tokens=8, stop_ids=[])
    diff = float(np.max(np.abs(logits - want_logits)))
    report(0 <= layers.n_resident < layers.n_layers and layers.bytes_streamed > 0 and ids == want_ids
           and diff <= 1e-5,
           f"streamed {backend} under {budget / 1e6:.0f} MB: {layers.n_resident} of {layers.n_layers} layers "
           f"resident, {layers.bytes_streamed} bytes streamed, ids {ids[0]} "
           f"{'==' if ids == want_ids else '!='} resident numpy, logits within {diff:.2e}")

print(f"{len(failures)} checks failed" if failures else "all checks passed", flush=True)
sys.exit(1 if failures else 0)
EOF

status=0
log "checks: synth, generate, logits, streamed"
in_root /bin/sh -c 'cd /tmp/aarch64-check && python check.py' 2>&1 | tee "$ROOT/tmp/aarch64-check/check.log" \
    || status=1
CHECKED=$(( $(date +%s) - START ))

log "kernel tests (generic tier)"
# test_kernels_prefill.py compares with transformers, which the root does not carry (torch); the numpy
# backend is the reference above. (--ignore does not apply to files named on the command line.)
in_root /bin/sh -c 'cd /opt/tinyllama-ref && python -m pytest -q -rs -p no:cacheprovider \
    $(ls tests/test_kernels_*.py | grep -v test_kernels_prefill.py) tests/test_cpu_tiers.py' \
    2>&1 | tee "$ROOT/tmp/aarch64-check/pytest.log" || status=1
END=$(( $(date +%s) - START ))

echo
echo "== aarch64 check of $COMMIT, $(date -u +%Y-%m-%d) =="
echo "$VERSIONS (qemu-user-static $(qemu-aarch64-static --version | head -1 | awk '{print $3}'))"
grep -E '^(ok|FAIL) |checks (passed|failed)' "$ROOT/tmp/aarch64-check/check.log" || echo "the checks did not run"
tail -1 "$ROOT/tmp/aarch64-check/pytest.log"
echo "elapsed: ${END} s (root ready at ${BOOTSTRAPPED} s, installed at ${INSTALLED} s, checks done at ${CHECKED} s)"
echo "result: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
