"""`bench generate --batch`: the decode rows against the I/O bound, on a tiny model streamed under a budget."""

import pytest

import tinyllama_ref
from tinyllama_ref import streaming
from tinyllama_ref.make.synth import synthesize
from tinyllama_ref.measure.bench_generate import bench


@pytest.fixture(scope="module")
def streamed_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, layers=12, quiet=True)
    return path


def test_batch_rows_probe_the_disk_around_every_batch_size(streamed_ckpt, monkeypatch):
    """The disk is probed before the first batch size and after each one, and timed while the read-ahead
    streams; the bound uses the best of those (the strictest bound), and the row reports each."""
    real_load = tinyllama_ref.load

    def tight_load(path, **kw):           # a budget of the streaming window and 3 more layers, set after load
        m = real_load(path, **kw)
        src = m.layers
        src.budget = src._fixed() + 2 * max(src.file_bytes) + streaming.READ_CHUNK + 3 * max(src.file_bytes)
        src.n_resident = src._plan()
        return m
    monkeypatch.setattr(tinyllama_ref, "load", tight_load)
    monkeypatch.setattr(streaming, "SAFETY_FRACTION", 0.0)
    recs = bench(streamed_ckpt, batches=(1, 2), prompt_tokens=4, new_tokens=2, backend="numpy")
    assert [r["batch"] for r in recs] == [1, 2]
    last = recs[-1]
    assert 0 < last["resident_layers"] < last["n_layers"], last                # it really streamed
    assert len(last["disk_gbps_probes"]) == 3
    assert recs[0]["disk_gbps_probes"] == last["disk_gbps_probes"][:2]
    for r in recs:
        assert r["disk_gbps_streaming"] > 0
        assert r["disk_gbps"] == max(r["disk_gbps_probes"] + [r["disk_gbps_streaming"]])
        assert r["streamed_bytes_per_pass"] > 0 and r["decode_s_per_pass"] > 0
        # both times are rounded to 0.1 ms in the row, a large share of a tiny model's bound
        rounding = 1e-4 / r["bound_s_per_pass"] + 1e-4 / r["decode_s_per_pass"] + 1e-3
        assert r["ratio_to_bound"] == pytest.approx(r["decode_s_per_pass"] / r["bound_s_per_pass"], rel=rounding)
