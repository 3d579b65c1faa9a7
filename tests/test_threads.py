"""The thread chooser (tinyllama_ref/threads.py) on simulated machines: pass times given by hand per phase."""

from tinyllama_ref.threads import PROBE_MAX, CpuMeter, ThreadChooser


def drive(chooser, seconds_for, passes, kind=("decode", 1)):
    """Run `passes` passes; seconds_for(threads) is the machine. Returns the thread count of every pass."""
    used = []
    for _ in range(passes):
        n = chooser.choose(kind)
        chooser.record(kind, n, seconds_for(n))
        used.append(n)
    return used


QUIET = {1: 1.6, 2: 1.0}        # two threads faster: both cores free
BUSY = {1: 1.3, 2: 2.5}         # one core taken by another process: the static split waits for it


def test_quiet_machine_keeps_two_threads_and_probes_rarely():
    c = ThreadChooser(2, meter=False)
    used = drive(c, QUIET.get, 1000)
    assert used[0] == 2
    probes = used.count(1)
    # Backoff 4, 8, 16, 32, 64, 64, ...: about 1000 / 64 + 4 probes, never one every few passes.
    assert 5 <= probes <= 1000 // PROBE_MAX + 6
    assert used[-50:].count(2) >= 49


def test_busy_core_switches_to_one_thread_and_back():
    c = ThreadChooser(2, meter=False)
    drive(c, QUIET.get, 200)
    used = drive(c, BUSY.get, 40)
    assert used[-20:].count(1) >= 19          # switched within 20 passes of the change
    used = drive(c, {1: 1.6, 2: 1.0}.get, 2 * PROBE_MAX + 10)
    assert used[-PROBE_MAX // 2:].count(2) >= PROBE_MAX // 2 - 1   # a later probe found two threads faster again


def test_fixed_count_is_never_changed():
    c = ThreadChooser(2, fixed=1, meter=False)
    assert set(drive(c, QUIET.get, 50)) == {1}
    assert set(drive(ThreadChooser(1, meter=False), BUSY.get, 50)) == {1}


def test_kinds_are_separate():
    c = ThreadChooser(2, meter=False)
    drive(c, BUSY.get, 40, kind=("decode", 1))
    assert c.choose(("decode", 8)) == 2        # another batch size starts from all threads
    assert c.choose(("decode", 1)) == 1


def test_bad_thread_counts_are_refused_clearly():
    import pytest
    from tinyllama_ref.errors import GenerationError
    from tinyllama_ref.threads import parse_threads
    assert parse_threads("auto") is None and parse_threads(None) is None and parse_threads("2") == 2
    for bad in ("0", "-1", "two", "1.5", True):
        with pytest.raises(GenerationError, match="positive number of threads"):
            parse_threads(bad)


def test_cli_threads_flag_gives_the_same_tokens_as_transformers(hf_checkpoints):
    """--threads 1 and --threads 2 on a real subprocess: the same greedy ids as transformers; a bad value is
    a usage error naming the flag, without a traceback."""
    import subprocess
    import sys
    from hf_models import hf_greedy, hf_model
    ckpt = hf_checkpoints("f32", dtype="float32")
    prompt = [1, 17, 250, 3, 99]
    ref = ",".join(map(str, hf_greedy(hf_model(ckpt), prompt, 6)))
    for n in ("1", "2"):
        p = subprocess.run([sys.executable, "-m", "tinyllama_ref", "generate", ckpt, "--prompt-ids",
                            ",".join(map(str, prompt)), "--max-new-tokens", "6", "--ignore-eos", "--threads", n],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip().splitlines()[-1] == ref
    p = subprocess.run([sys.executable, "-m", "tinyllama_ref", "generate", ckpt, "--prompt-ids", "1,5",
                        "--threads", "zero"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--threads" in p.stderr and "Traceback" not in p.stderr


class FakeCounters:
    """/proc/stat and os.times by hand: the machine's busy seconds, ours, and the wall clock."""

    def __init__(self):
        self.machine = self.ours = self.wall = 0.0

    def run(self, seconds, our_cores, other_cores):
        self.wall += seconds
        self.ours += seconds * our_cores
        self.machine += seconds * (our_cores + other_cores)

    def __call__(self):
        return self.machine, self.ours, self.wall


def test_meter_leaves_a_core_taken_by_another_process():
    clock = FakeCounters()
    c = ThreadChooser(2, meter=CpuMeter(read=clock))
    kind = ("decode", 1)
    used = []
    for step in range(30):
        other = 1.0 if 10 <= step < 20 else 0.05         # another process holds a core in passes 10-19
        n = c.choose(kind)
        used.append(n)
        clock.run(0.2, our_cores=n, other_cores=other)
        c.record(kind, n, 0.2)
    assert used[1:10] == [2] * 9                           # quiet: both cores
    assert used[12:20] == [1] * 8                          # taken: within two passes, one thread
    assert used[23:] == [2] * 7                            # free again: both
    # Our own CPU time is never counted as another process's: two busy threads of ours alone stay at 2.
    clock2 = FakeCounters()
    c2 = ThreadChooser(2, meter=CpuMeter(read=clock2))
    for _ in range(10):
        n = c2.choose(kind)
        clock2.run(0.2, our_cores=2.0, other_cores=0.0)
    assert n == 2


def test_load_refuses_bad_thread_settings(hf_checkpoints, monkeypatch):
    import numba
    import pytest
    import tinyllama_ref
    from tinyllama_ref.errors import GenerationError
    ckpt = hf_checkpoints("f32", dtype="float32")
    monkeypatch.setenv("TINYLLAMA_THREADS", "lots")
    with pytest.raises(GenerationError, match=r"\$TINYLLAMA_THREADS must be a positive number"):
        tinyllama_ref.load(ckpt)
    monkeypatch.delenv("TINYLLAMA_THREADS")
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    m = tinyllama_ref.load(ckpt, threads=too_many)
    with pytest.raises(GenerationError, match=f"threads={too_many} is more than"):
        m.logits([1, 5, 6])


def test_prefill_profile_bad_input_is_one_line(tmp_path):
    import subprocess
    import sys
    run = [sys.executable, "-m", "tinyllama_ref", "bench", "prefill-profile"]
    p = subprocess.run(run + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "missing" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(run + [str(tmp_path), "--tokens", "0,x"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--tokens" in p.stderr and "Traceback" not in p.stderr


def test_prefill_profile_accounts_for_a_tiny_prefill(hf_checkpoints):
    """Each step is counted once per layer, and no step is counted twice (what is left over is >= 0)."""
    import tinyllama_ref
    from tinyllama_ref.measure.prefill_profile import profile
    ckpt = hf_checkpoints("f32", dtype="float32")
    m = tinyllama_ref.load(ckpt, backend="numpy")
    r = profile(m, tokens=(20,), repetitions=1)[20]
    cats = r["categories"]
    assert cats["rms_norm"]["calls"] == 2 * m.cfg.n_layers + 1
    assert cats["swiglu"]["calls"] == m.cfg.n_layers
    assert cats["attention"]["calls"] == m.cfg.n_layers
    assert 0 <= cats["other"]["s"] < r["pass_s"]
