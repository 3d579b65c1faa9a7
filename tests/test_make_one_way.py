"""Each job of make/ written once: the stored-zero rule, the dequantize loop, the writer in production order,
quantize starting over after an interruption, the progress line, and the same flag names on every command.

References: tests/gptq_packer.py (stored zeros and weights written from the format description), the real
`safetensors` library (reading what our writer wrote), an uninterrupted run (for the restarted one), click's
own parsing of the installed command (for the flags).
"""

import io
import json
import os

import click
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from gptq_packer import make_layer
from quantize_helpers import make_trained_llama, pattern_corpus
from tinyllama_ref import quant
from tinyllama_ref.cli import main
from tinyllama_ref.errors import CheckpointError, QuantError, TinyLlamaError
from tinyllama_ref.make.quantize import PARTIAL, quantize_checkpoint
from tinyllama_ref.make.safetensors_writer import SafetensorsWriter, TensorSpec
from tinyllama_ref.memory import human, parse_size
from tinyllama_ref.progress import Progress


# -- one stored-zero rule, one dequantize loop -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_stored_zeros_are_what_the_packer_from_the_format_description_stores(bits, fmt):
    layer = make_layer(np.random.default_rng(bits), 64, 512, bits, 16, sym=False, checkpoint_format=fmt)
    assert {0, 2 ** bits - 1} <= set(np.unique(layer["zeros"]))          # the wrapping case is present
    stored = quant.stored_zeros(layer["zeros"], bits, fmt)
    np.testing.assert_array_equal(stored, layer["stored_zeros"])
    np.testing.assert_array_equal(quant.true_zeros(stored, bits, fmt), layer["zeros"])


def test_stored_zeros_by_hand_and_an_unknown_format():
    assert quant.stored_zeros(0, 4, "gptq") == 15 and quant.stored_zeros(8, 4, "gptq") == 7
    assert quant.stored_zeros(0, 3, "gptq") == 7 and quant.stored_zeros(4, 3, "gptq_v2") == 4
    with pytest.raises(QuantError, match="checkpoint_format must be one of gptq, gptq_v2"):
        quant.stored_zeros(1, 4, "marlin")


@pytest.mark.parametrize("bits,n_out,step", [(3, 70, 32), (4, 40, 8), (2, 33, 16), (8, 9, 4)])
def test_dequantized_slabs_tile_the_weight_of_the_packer(bits, n_out, step):
    layer = make_layer(np.random.default_rng(n_out), 48, n_out, bits, 16, act_order=True, sym=False)
    slabs = list(quant.dequantized_slabs(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits,
                                         "gptq", columns_per_step=step))
    assert [j0 for j0, _, _ in slabs] == sorted({j0 for j0, _, _ in slabs}) and slabs[-1][1] == n_out
    assert len(slabs) > 1
    np.testing.assert_array_equal(np.concatenate([w for _, _, w in slabs], axis=1), layer["W"])


# -- the writer in production order ----------------------------------------------------------------------------

def test_writer_in_given_order_is_read_back_by_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"z.f16": rng.standard_normal((3, 4)).astype(np.float16),
               "a.i32": rng.integers(-9, 9, size=(5,), dtype=np.int32),
               "m.f32": rng.standard_normal((2, 2)).astype(np.float32)}
    specs = [TensorSpec(n, {np.float16: "F16", np.int32: "I32", np.float32: "F32"}[a.dtype.type], a.shape)
             for n, a in tensors.items()]
    out = tmp_path / "x.safetensors"
    with SafetensorsWriter(str(out), specs, {"format": "pt"}, order="given") as w:
        assert [s.name for s in w.order] == list(tensors)                 # the caller's order, not sorted
        for name, array in tensors.items():
            w.write(name, array)
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for name, array in tensors.items():
            np.testing.assert_array_equal(f.get_tensor(name), array)
    header = json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
    starts = [header[n]["data_offsets"][0] for n in tensors]
    assert starts == sorted(starts)                                        # data in the given order too


def test_writer_keeps_its_partial_file_and_resumes_it_only_for_the_same_header(tmp_path):
    specs = [TensorSpec("a", "I32", (4,)), TensorSpec("b", "F16", (2, 3)), TensorSpec("c", "I32", (5,))]
    a, b, c = np.arange(4, dtype=np.int32), np.ones((2, 3), np.float16), np.arange(5, dtype=np.int32) * 7
    out, partial = tmp_path / "x.safetensors", tmp_path / "x.safetensors.partial"

    def writer(meta):
        return SafetensorsWriter(str(out), specs, meta, order="given", partial=str(partial), keep_partial=True,
                                 resume=True)
    with pytest.raises(KeyboardInterrupt):
        with writer({"run": "1"}) as w:
            w.write("a", a)
            w.write("b", b[:1])                                          # half of b reached the disk
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == [partial.name]
    with writer({"run": "1"}) as w:
        assert w.resumed == ["a"]
        np.testing.assert_array_equal(w.read_back("a"), a)
        w.write("b", b)
        w.write("c", c)
    with safe_open(str(out), framework="numpy") as f:
        for name, array in zip("abc", (a, b, c)):
            np.testing.assert_array_equal(f.get_tensor(name), array)
    with pytest.raises(KeyboardInterrupt):
        with writer({"run": "1"}) as w:
            w.write("a", a)
            raise KeyboardInterrupt
    with writer({"run": "2"}) as w:                                      # another header: written afresh
        assert w.resumed == []
        w.write("a", a + 1)
        w.write("b", b)
        w.write("c", c)
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata() == {"run": "2"}
        np.testing.assert_array_equal(f.get_tensor("a"), a + 1)


# -- quantize: resuming in an interrupted run's directory ------------------------------------------------------

CALIBRATION = [pattern_corpus(seed=s, n_tokens=96) for s in range(4)]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_trained_llama(str(tmp_path_factory.mktemp("dense") / "dense"), steps=20)


def interrupt_at(monkeypatch, call):
    """Make the n-th GPTQ call of the driver raise KeyboardInterrupt, as Ctrl-C would; returns the undo."""
    import tinyllama_ref.make.quantize as driver
    real, calls = driver.gptq_quantize, []

    def failing(W, H, **kw):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(W, H, **kw)
    monkeypatch.setattr(driver, "gptq_quantize", failing)
    return lambda: monkeypatch.setattr(driver, "gptq_quantize", real)


def same_files(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def clean_run(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "gptq"
    quantize_checkpoint(dense, str(out), CALIBRATION, bits=4, group_size=32)
    return out


def test_quantize_resumes_an_interrupted_run_and_writes_the_same_bytes(dense, clean_run, tmp_path, monkeypatch):
    undo = interrupt_at(monkeypatch, 9)                      # the second layer's k_proj
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(dense, str(out), CALIBRATION, bits=4, group_size=32)
    assert os.listdir(out) == [PARTIAL]
    undo()
    log = io.StringIO()
    errors = quantize_checkpoint(dense, str(out), CALIBRATION, bits=4, group_size=32, quiet=False,
                                 progress_stream=log)
    same_files(out, clean_run)
    assert list(errors) == [1]                               # only layer 2 was quantized again
    lines = log.getvalue().splitlines()                      # not a terminal: only the permanent lines
    assert "resuming" in lines[0] and f"{PARTIAL} holds layers 1-1 of 2" in lines[0]
    assert lines[1].startswith(f"layer 1/2 [#######] read back from {PARTIAL}")
    assert lines[2].startswith("layer 2/2 [#######] done, worst output error ") and len(lines) == 3


def test_a_partial_file_of_other_calibration_is_not_resumed(dense, clean_run, tmp_path, monkeypatch):
    undo = interrupt_at(monkeypatch, 9)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(dense, str(out), CALIBRATION[::-1], bits=4, group_size=32)
    undo()
    log = io.StringIO()
    quantize_checkpoint(dense, str(out), CALIBRATION, bits=4, group_size=32, quiet=False, progress_stream=log)
    same_files(out, clean_run)
    assert "starting over" in log.getvalue().splitlines()[0]


def test_quantize_refuses_a_directory_with_anything_else_in_it(dense, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / PARTIAL).write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TinyLlamaError, match="not empty .*notes.txt"):
        quantize_checkpoint(dense, str(out), CALIBRATION, bits=4, group_size=32)
    assert sorted(os.listdir(out)) == sorted([PARTIAL, "notes.txt"])      # nothing was touched


def test_quantize_checks_the_disk_before_it_starts(dense, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**5, 10**5))
    with pytest.raises(CheckpointError, match=r"needs \d+\.\d MB, only 100\.0 kB free on "):
        quantize_checkpoint(dense, str(tmp_path / "out"), CALIBRATION, bits=4, group_size=32)
    assert os.listdir(tmp_path) == []                                      # not even OUT was created


# -- one progress line, one byte formatter ---------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_on_a_terminal_and_keeps_only_the_summary_elsewhere():
    shown, log, quiet = Terminal(), io.StringIO(), Terminal()
    for stream, enabled in ((shown, True), (log, True), (quiet, False)):
        bar = Progress("layer 2/9", total=4, enabled=enabled, stream=stream, width=4)
        for k in range(1, 5):
            bar.update(k, note="q")
        bar.close("done")
    assert shown.getvalue().startswith("\rlayer 2/9 [#...] q 1/4 it (25%) ")
    assert shown.getvalue().split("\r")[-1].startswith("layer 2/9 [####] done (")
    assert log.getvalue().startswith("layer 2/9 [####] done (") and log.getvalue().count("\n") == 1
    assert quiet.getvalue() == ""


def test_bytes_are_formatted_one_way_and_read_back():
    assert [human(n) for n in (0, 999, 1000, 1_500_000, 36_700_000_000, 2 * 10**12)] == \
        ["0 B", "999 B", "1.0 kB", "1.5 MB", "36.7 GB", "2.0 TB"]
    assert parse_size(human(36_700_000_000)) == 36_700_000_000


# -- the same flag for the same thing --------------------------------------------------------------------------

def commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))
        else:
            yield " ".join(prefix + (name,)), cmd


def test_the_same_flag_names_for_the_same_things():
    spelled = {}
    for name, cmd in commands(main):
        for p in cmd.params:
            if isinstance(p, click.Option):
                spelled.setdefault(p.name, set()).add(tuple(sorted(p.opts + p.secondary_opts)))
    assert spelled["checkpoint_format"] == {("--checkpoint-format",)}
    assert spelled["sym"] == {("--asym", "--sym")}
    assert spelled["quiet"] == {("--quiet", "-q")}
    for name in ("synth", "quantize", "verify", "generate", "perplexity", "score"):
        assert "quiet" in {p.name for p in dict(commands(main))[name].params}, name


def test_synth_asym_and_quantize_checkpoint_format_from_the_command_line(dense, tmp_path):
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "s"), "--layers", "1", "--asym", "-q"])
    assert r.exit_code == 0, r.output
    qc = json.loads((tmp_path / "s" / "quantize_config.json").read_text())
    assert qc["sym"] is False
    with safe_open(str(tmp_path / "s" / "model.safetensors"), framework="numpy") as f:
        qzeros = f.get_tensor("model.layers.0.mlp.up_proj.qzeros")
    assert len(np.unique(qzeros)) > 1                                     # zeros differ by group and column
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(CALIBRATION))
    r = CliRunner().invoke(main, ["quantize", dense, str(tmp_path / "q"), "--calibration-ids", str(ids),
                                  "--group-size", "32", "--checkpoint-format", "gptq_v2", "-q"])
    assert r.exit_code == 0, r.output
    assert "layer" not in r.output
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
