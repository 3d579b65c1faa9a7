"""The synthetic checkpoint writer: streaming safetensors files, the TheBloke GPTQ layout, and the CLI.

Layout facts are checked against docs/formats.md (names, shapes, dtypes, packing), against the `safetensors`
package (header parsing, and byte-for-byte equality with its own writer), and against the published sizes of
the six Meditron-70B GPTQ branches.
"""

import collections
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import save_file

import tinyllama_ref
from gptq_packer import pack_stream_columns, pack_stream_rows
from tinyllama_ref.make import synth
from tinyllama_ref.checkpoint import Checkpoint
from tinyllama_ref.cli.synth import synth as synth_command
from tinyllama_ref.config import preset
from tinyllama_ref.errors import CheckpointError, ConfigError
from tinyllama_ref.quant import QuantConfig, unpack_columns, unpack_zeros
from tinyllama_ref.make.safetensors_writer import SafetensorsWriter, TensorSpec, file_size

TINY = preset("tiny")
LINEAR_SHAPES = {   # sub-name: (in, out) for the tiny preset
    "self_attn.q_proj": (TINY.dim, TINY.n_heads * TINY.head_dim),
    "self_attn.k_proj": (TINY.dim, TINY.n_kv_heads * TINY.head_dim),
    "self_attn.v_proj": (TINY.dim, TINY.n_kv_heads * TINY.head_dim),
    "self_attn.o_proj": (TINY.n_heads * TINY.head_dim, TINY.dim),
    "mlp.gate_proj": (TINY.dim, TINY.hidden_dim),
    "mlp.up_proj": (TINY.dim, TINY.hidden_dim),
    "mlp.down_proj": (TINY.hidden_dim, TINY.dim),
}


def expected_gptq_tensors(cfg, bits, group_size, n_layers):
    """docs/formats.md's table, written out independently of synth.py: name -> (shape, dtype)."""
    V, D = cfg.vocab_size, cfg.dim
    want = {"model.embed_tokens.weight": ((V, D), "F16"), "lm_head.weight": ((V, D), "F16"),
            "model.norm.weight": ((D,), "F16")}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        want[p + "input_layernorm.weight"] = ((D,), "F16")
        want[p + "post_attention_layernorm.weight"] = ((D,), "F16")
        for sub, (n_in, n_out) in LINEAR_SHAPES.items():
            G = 1 if group_size == -1 else -(-n_in // group_size)
            want[p + sub + ".qweight"] = ((-(-n_in * bits // 32), n_out), "I32")
            want[p + sub + ".qzeros"] = ((G, -(-n_out * bits // 32)), "I32")
            want[p + sub + ".scales"] = ((G, n_out), "F16")
            want[p + sub + ".g_idx"] = ((n_in,), "I32")
            want[p + sub + ".bias"] = ((n_out,), "F16")
    return want


def header_of(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def check_model_runs(path):
    """The model loads with our loader and gives finite logits that depend on the input and the position."""
    model = tinyllama_ref.load(path, backend="numpy")
    logits = model.logits([1, 17, 200, 42, 999, 5, 5, 5])            # [8, V]
    assert logits.shape == (8, model.cfg.vocab_size)
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1                                       # not all equal
    # Positions must not collapse onto one vector (the failure mode of mean-biased random codes).
    a, b = logits[1], logits[4]
    assert np.corrcoef(a, b)[0, 1] < 0.9
    return logits


# -- the streaming safetensors writer ------------------------------------------------------------------------

def test_writer_matches_the_reference_writer_byte_for_byte(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.10.mlp.up_proj.qweight": rng.integers(-2**31, 2**31, size=(7, 5), dtype=np.int32),
        "model.layers.2.mlp.up_proj.scales": rng.standard_normal((3, 5)).astype(np.float16),
        "lm_head.weight": rng.standard_normal((9, 4)).astype(np.float16),
        "a.f32": rng.standard_normal((2, 3)).astype(np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "model.layers.2.mlp.up_proj.g_idx": np.arange(11, dtype=np.int32),
    }
    meta = {"format": "pt"}     # one key: the reference writes metadata keys in random (hash map) order
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=meta)
    specs = [TensorSpec(n, {np.int32: "I32", np.float16: "F16", np.float32: "F32"}[a.dtype.type], a.shape)
             for n, a in tensors.items()]
    out = tmp_path / "ours.safetensors"
    with SafetensorsWriter(str(out), specs, meta) as w:
        for spec in w.order:
            arr = tensors[spec.name]
            for r0 in range(0, arr.shape[0], 2):              # several chunks per tensor
                w.write(spec.name, arr[r0:r0 + 2])
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert file_size(specs, meta) == out.stat().st_size
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial")]
    meta = {"format": "pt", "gptq_bits": "4", "gptq_desc_act": "True"}
    with SafetensorsWriter(str(out), specs, meta) as w:
        for spec in w.order:
            w.write(spec.name, tensors[spec.name])
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata() == meta
        for name, arr in tensors.items():
            np.testing.assert_array_equal(f.get_tensor(name), arr)


@pytest.mark.parametrize("mistake", ["order", "too_many", "incomplete", "dtype", "exception"])
def test_writer_leaves_nothing_behind_on_error(tmp_path, mistake):
    specs = [TensorSpec("a", "I32", (4,)), TensorSpec("b", "I32", (2,))]
    out = tmp_path / "x.safetensors"
    with pytest.raises((CheckpointError, RuntimeError)) as err:
        with SafetensorsWriter(str(out), specs) as w:
            assert (tmp_path / ".partial-x.safetensors").exists()
            if mistake == "order":
                w.write("b", np.zeros(2, np.int32))
            elif mistake == "too_many":
                w.write("a", np.zeros(5, np.int32))
            elif mistake == "incomplete":
                w.write("a", np.zeros(4, np.int32))
                w.write("b", np.zeros(1, np.int32))
            elif mistake == "dtype":
                w.write("a", np.zeros(4, np.float32))
            else:
                w.write("a", np.zeros(4, np.int32))
                raise RuntimeError("generator failed")
    if mistake == "order":
        assert "header order" in str(err.value) and "a is still missing 16" in str(err.value)
    if mistake == "incomplete":
        assert "tensor b holding 4 of its 8 bytes" in str(err.value)
    assert os.listdir(tmp_path) == []


# -- GPTQ checkpoints ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_4bit(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "tiny-4bit")
    summary = synth.synthesize(out, preset="tiny", bits=4, group_size=128, act_order=True, quiet=True)
    return out, summary


@pytest.fixture(scope="module")
def tiny_3bit(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "tiny-3bit")
    synth.synthesize(out, preset="tiny", bits=3, group_size=32, act_order=True, layers=2, quiet=True)
    return out


def check_gptq_layout(path, bits, group_size, n_layers):
    file = os.path.join(path, "model.safetensors")
    want = expected_gptq_tensors(TINY, bits, group_size, n_layers)
    header = header_of(file)
    assert header.pop("__metadata__")["format"] == "pt"
    got = {name: (tuple(e["shape"]), e["dtype"]) for name, e in header.items()}
    assert got == want
    # The data order is the reference writer's: every I32 tensor before every F16 tensor, names sorted.
    order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    assert order == sorted(order, key=lambda n: (header[n]["dtype"] != "I32", n))
    with safe_open(file, framework="numpy") as f:
        assert set(f.keys()) == set(want)
        for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.qweight"):
            t = f.get_tensor(name)
            assert (tuple(t.shape), t.dtype) == (want[name][0], {"F16": np.float16, "I32": np.int32}
                                                 [want[name][1]])

    cfg = json.load(open(os.path.join(path, "config.json")))
    qcfg = json.load(open(os.path.join(path, "quantize_config.json")))
    assert cfg["quantization_config"] == qcfg
    assert qcfg["bits"] == bits and qcfg["group_size"] == group_size and qcfg["desc_act"] is True
    assert qcfg["sym"] is True and qcfg["checkpoint_format"] == "gptq" and qcfg["damp_percent"] == 0.1
    assert qcfg["model_file_base_name"] == "model" and qcfg["quant_method"] == "gptq"
    assert cfg["num_hidden_layers"] == n_layers and cfg["vocab_size"] == TINY.vocab_size
    gen = json.load(open(os.path.join(path, "generation_config.json")))
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def check_gptq_values(path, bits, group_size):
    """Decode every linear with quant.py, then re-encode with the test-side packer from docs/formats.md: the
    words must come back identical (including zeroed padding bits in a partly used last word)."""
    ckpt = Checkpoint(path)
    half = 1 << (bits - 1)
    for sub, (n_in, n_out) in LINEAR_SHAPES.items():
        p = f"model.layers.1.{sub}."
        qweight, qzeros = ckpt.raw(p + "qweight"), ckpt.raw(p + "qzeros")
        codes = unpack_columns(qweight, bits, n_in)                    # [in, out]
        assert codes.min() >= 1 and codes.max() == (1 << bits) - 1    # code 0 was moved to the zero point
        counts = np.bincount(codes.ravel(), minlength=1 << bits)
        others = np.delete(counts, [0, half])                          # every code but 0 and the zero point
        assert counts[half] == pytest.approx(2 * others.mean(), rel=0.2)   # the zero point comes up twice as often
        np.testing.assert_array_equal(pack_stream_columns(codes, bits), qweight)
        stored = unpack_zeros(qzeros, bits, n_out)                     # [G, out]
        assert (stored == half - 1).all()                              # "gptq" v1 stores zero - 1
        np.testing.assert_array_equal(pack_stream_rows(stored, bits), qzeros)
        g_idx = ckpt.raw(p + "g_idx")
        pattern = np.arange(n_in) // group_size
        np.testing.assert_array_equal(np.sort(g_idx), pattern)         # a permutation of the group pattern
        assert (np.diff(g_idx) < 0).any()                              # ... and not monotonic (act-order)
        scales = ckpt.f32(p + "scales")
        assert (scales > 0).all()
        # dequantized std close to GAIN / sqrt(in)
        std = scales.mean() * synth.code_std(bits)
        assert std == pytest.approx(synth.GAIN / np.sqrt(n_in), rel=0.05)
        assert not ckpt.f32(p + "bias").any()


def test_tiny_4bit_g128_act_order_layout(tiny_4bit):
    path, summary = tiny_4bit
    check_gptq_layout(path, 4, 128, TINY.n_layers)
    assert summary["files"] == sorted(["config.json", "quantize_config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                                       "special_tokens_map.json", "added_tokens.json"])


def test_tiny_4bit_values_round_trip(tiny_4bit):
    check_gptq_values(tiny_4bit[0], 4, 128)


def test_tiny_3bit_g32_layout_and_values(tiny_3bit):
    # down_proj has 688 inputs: 2064 bits, so its last qweight word is only half used.
    check_gptq_layout(tiny_3bit, 3, 32, 2)
    check_gptq_values(tiny_3bit, 3, 32)


def test_tiny_gptq_models_run(tiny_4bit, tiny_3bit):
    check_model_runs(tiny_4bit[0])
    check_model_runs(tiny_3bit)


def test_added_tokens_lie_past_the_embedding(tiny_4bit):
    path = tiny_4bit[0]
    added = json.load(open(os.path.join(path, "added_tokens.json")))
    assert added == {"<|im_start|>": TINY.vocab_size, "<|im_end|>": TINY.vocab_size + 1}
    rows = header_of(os.path.join(path, "model.safetensors"))["model.embed_tokens.weight"]["shape"][0]
    assert min(added.values()) >= rows
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    assert sp.get_piece_size() == TINY.vocab_size and sp.bos_id() == 1 and sp.eos_id() == 2
    special = json.load(open(os.path.join(path, "special_tokens_map.json")))
    assert special["bos_token"] == "<s>" and special["eos_token"] == "</s>"
    tok_cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert tok_cfg["added_tokens_decoder"][str(TINY.vocab_size + 1)]["content"] == "<|im_end|>"


def test_no_groups_and_gptq_v2(tmp_path):
    out = str(tmp_path / "g-1")
    synth.synthesize(out, preset="tiny", bits=4, group_size=-1, act_order=True, checkpoint_format="gptq_v2",
                     layers=1, quiet=True)
    ckpt = Checkpoint(out)
    p = "model.layers.0.mlp.down_proj."
    assert ckpt.info(p + "scales").shape == (1, TINY.dim)
    assert not ckpt.raw(p + "g_idx").any()                             # one group: every g_idx is 0
    assert (unpack_zeros(ckpt.raw(p + "qzeros"), 4, TINY.dim) == 8).all()   # v2 stores the true zero
    assert json.load(open(os.path.join(out, "quantize_config.json")))["checkpoint_format"] == "gptq_v2"
    check_model_runs(out)


def test_meditron_branch_sizes_match_the_published_files():
    """The six Meditron-70B GPTQ branches (docs/formats.md table, sizes in GB as the Hub shows them)."""
    cfg = preset("llama2-70b")
    for bits, group, published in [(4, -1, 35.3), (4, 128, 36.7), (4, 32, 40.7),
                                   (3, -1, 26.8), (3, 128, 28.0), (3, 32, 31.8)]:
        plan = synth.model_plan(cfg, QuantConfig(bits=bits, group_size=group, desc_act=True), "F16")
        size = file_size([p.spec for p in plan], synth.safetensors_metadata(None))
        assert round(size / 1e9, 1) == published, (bits, group)


# -- dense checkpoints ---------------------------------------------------------------------------------------

def test_dense_fp16_sharded_matches_single_file(tmp_path):
    one, three = str(tmp_path / "one"), str(tmp_path / "three")
    synth.synthesize(one, preset="tiny", dense_dtype="fp16", layers=2, quiet=True)
    synth.synthesize(three, preset="tiny", dense_dtype="fp16", layers=2, shards=3, quiet=True)
    index = json.load(open(os.path.join(three, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p for p in os.listdir(three) if p.endswith(".safetensors")) == shards
    cfg = json.load(open(os.path.join(three, "config.json")))
    assert "quantization_config" not in cfg and not os.path.exists(os.path.join(three, "quantize_config.json"))
    a, b = Checkpoint(one), Checkpoint(three)
    assert set(a.tensors) == set(b.tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == a.nbytes()
    for name in a.tensors:
        assert a.info(name).dtype == "F16"
        np.testing.assert_array_equal(a.raw(name), b.raw(name))        # values do not depend on sharding
    assert a.info("model.layers.1.mlp.down_proj.weight").shape == (TINY.dim, TINY.hidden_dim)
    np.testing.assert_allclose(check_model_runs(one), check_model_runs(three))


def test_dense_bf16(tmp_path):
    out = str(tmp_path / "bf16")
    synth.synthesize(out, preset="tiny", dense_dtype="bf16", layers=2, quiet=True)
    ckpt = Checkpoint(out)
    assert {t.dtype for t in ckpt.tensors.values()} == {"BF16"}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    w = ckpt.f32("model.layers.0.self_attn.q_proj.weight")
    assert w.std() == pytest.approx(synth.GAIN / np.sqrt(TINY.dim), rel=0.05)
    check_model_runs(out)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 3
    ours = synth.f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


# -- refusals ------------------------------------------------------------------------------------------------

def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    out = tmp_path / "new" / "ckpt"
    with pytest.raises(CheckpointError, match=r"needs 1\d\.\d MB, only 1\.0 MB free on "):
        synth.synthesize(str(out), preset="tiny", quiet=True)
    assert not (tmp_path / "new").exists()
    # The 70B check uses the exact size, without writing anything.
    with pytest.raises(CheckpointError, match=r"needs 36\.7 GB"):
        synth.synthesize(str(out), preset="llama2-70b", bits=4, group_size=128, quiet=True)
    assert os.listdir(tmp_path) == []


def test_refuses_a_non_empty_directory_and_bad_arguments(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not empty"):
        synth.synthesize(str(tmp_path), preset="tiny", quiet=True)
    assert os.listdir(tmp_path) == ["config.json"]
    for kwargs, match in [({"bits": 5}, "--bits 5"), ({"group_size": 0}, "--group-size 0"),
                          ({"dense_dtype": "fp8"}, "--dense 'fp8'"), ({"preset": "llama3"}, "unknown preset"),
                          ({"layers": 0}, "--layers"), ({"shards": 10**6}, "--shards")]:
        with pytest.raises(ConfigError, match=match):
            synth.synthesize(str(tmp_path / "x"), quiet=True, **{"preset": "tiny", **kwargs})
    assert not (tmp_path / "x").exists()


def test_failure_mid_write_removes_everything(tmp_path, monkeypatch):
    def broken(spec, rng, *args, **kwargs):
        yield np.zeros((1,) + tuple(spec.shape[1:]), dtype=np.int32)
        raise OSError("disk full")
    monkeypatch.setattr(synth, "qweight_slabs", broken)
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        synth.synthesize(str(out), preset="tiny", layers=1, quiet=True)
    assert not out.exists()


# -- the command line ----------------------------------------------------------------------------------------

def test_cli_writes_a_checkpoint(tmp_path):
    out = str(tmp_path / "cli")
    result = CliRunner().invoke(synth_command, [out, "--preset", "tiny", "--bits", "3", "--group-size", "32",
                                                "--act-order", "--layers", "1", "--seed", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output
    assert json.load(open(os.path.join(out, "quantize_config.json")))["bits"] == 3
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 1


def test_cli_help_and_errors(tmp_path):
    result = CliRunner().invoke(synth_command, ["--help"])
    assert result.exit_code == 0 and "--preset llama2-70b" in result.output and "--dense" in result.output
    (tmp_path / "f").write_text("x")
    result = CliRunner().invoke(synth_command, [str(tmp_path), "--preset", "tiny", "--quiet"])
    assert result.exit_code == 1 and "error:" in result.output and "not empty" in result.output


def test_deep_model_stays_well_behaved(tmp_path):
    """32 layers: activations stay finite and positions stay distinct. With plain uniform codes (mean -1/2
    around the zero point) every position collapses onto one vector here: correlation 0.999 between the
    logits of different tokens, against about 0.7 with code 0 moved to the zero point."""
    out = str(tmp_path / "deep")
    synth.synthesize(out, preset="tiny", layers=32, quiet=True)
    logits = tinyllama_ref.load(out, backend="numpy").logits([1, 17, 200, 42, 999, 300])   # [6, V]
    assert np.isfinite(logits).all() and 0.3 < logits.std() < 10
    corr = np.corrcoef(logits)                                                          # [6, 6]
    mean_off_diagonal = (corr.sum() - 6) / 30
    assert mean_off_diagonal < 0.95


def test_progress_line_only_on_a_terminal(tmp_path):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown, hidden = Terminal(), io.StringIO()
    synth.synthesize(str(tmp_path / "a"), preset="tiny", layers=1, progress_stream=shown)
    synth.synthesize(str(tmp_path / "b"), preset="tiny", layers=1, progress_stream=hidden)
    synth.synthesize(str(tmp_path / "c"), preset="tiny", layers=1, progress_stream=shown, quiet=True)
    lines = shown.getvalue().rstrip("\n").split("\r")
    assert "synth: model.safetensors" in lines[-1] and "(100%)" in lines[-1]
    assert shown.getvalue().count("\n") == 1 and hidden.getvalue() == ""


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n_in", [64, 100, 688])
def test_qweight_slabs_are_valid_bit_streams_across_slab_boundaries(bits, n_in):
    """Small slabs force many slab boundaries; n_in 100 and 688 leave a partly used last word for 3 bits."""
    from tinyllama_ref.make.safetensors_writer import TensorSpec as Spec
    n_out = 40
    spec = Spec("w", "I32", (-(-n_in * bits // 32), n_out))
    slabs = list(synth.qweight_slabs(spec, np.random.default_rng(bits), bits, n_in, chunk_bytes=4 * n_out * 3))
    assert len(slabs) > 1 and all(s.dtype == np.int32 for s in slabs)
    qweight = np.concatenate(slabs)
    assert qweight.shape == spec.shape
    codes = unpack_columns(qweight, bits, n_in)
    assert codes.min() >= 1                                                    # code 0 never survives
    assert codes.max() == (1 << bits) - 1 or bits == 8                         # 255 may not come up in 2560
    assert (codes == 1 << (bits - 1)).any()
    np.testing.assert_array_equal(pack_stream_columns(codes, bits), qweight)   # padding bits are zero


def test_asymmetric_without_act_order(tmp_path):
    out = str(tmp_path / "asym")
    synth.synthesize(out, preset="tiny", bits=4, group_size=64, act_order=False, sym=False, layers=1, quiet=True)
    qcfg = json.load(open(os.path.join(out, "quantize_config.json")))
    assert qcfg["sym"] is False and qcfg["desc_act"] is False
    ckpt = Checkpoint(out)
    p = "model.layers.0.mlp.up_proj."
    np.testing.assert_array_equal(ckpt.raw(p + "g_idx"), np.arange(TINY.dim) // 64)   # monotonic
    stored = unpack_zeros(ckpt.raw(p + "qzeros"), 4, TINY.hidden_dim)             # [4, 688]
    assert set(np.unique(stored)) == {6, 7, 8}                                    # true zeros 7, 8, 9
    np.testing.assert_array_equal(pack_stream_rows(stored, 4), ckpt.raw(p + "qzeros"))
    check_model_runs(out)


def test_transformers_reads_the_dense_sharded_layout(tmp_path):
    """The dense layout is plain Hugging Face: transformers loads the shards via the index and agrees."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    synth.synthesize(out, preset="tiny", dense_dtype="fp16", layers=2, shards=2, quiet=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = [1, 17, 200, 42, 999, 300]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()                      # [6, V]
    got = tinyllama_ref.load(out, backend="numpy").logits(ids)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_gptq_shards_and_seeds(tmp_path):
    """GPTQ files may be sharded too; the same seed gives the same bytes, another seed other values."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    synth.synthesize(a, preset="tiny", layers=1, seed=5, quiet=True)
    synth.synthesize(b, preset="tiny", layers=1, seed=5, quiet=True)
    synth.synthesize(c, preset="tiny", layers=1, seed=6, shards=2, quiet=True)
    data = open(os.path.join(a, "model.safetensors"), "rb").read()
    assert data == open(os.path.join(b, "model.safetensors"), "rb").read()
    sharded = Checkpoint(c)
    assert len(sharded.files) == 2 and set(sharded.tensors) == set(Checkpoint(a).tensors)
    name = "model.layers.0.self_attn.q_proj.qweight"
    assert not np.array_equal(sharded.raw(name), Checkpoint(a).raw(name))
    check_model_runs(c)
