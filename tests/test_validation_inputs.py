"""Bad command-line and Python API input: one clear error each (exit 1; exit 2 only for click's usage errors),
no traceback; and the limits that keep a hostile config cheap (a FIFO shard, 10**8 positions, 10**9 layers).
"""

import json
import os
import subprocess
import sys
import time

import pytest

import tinyllama_ref
from tinyllama_ref.errors import (CheckpointError, ConfigError, GenerationError, MemoryBudgetError,
                                  TinyLlamaError, TokenizerError)
from validation_cases import assert_one_line_error, cli, copy_base, make_base, replace_with_fifo, set_key


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_base("gptq", str(tmp_path_factory.mktemp("inputs") / "gptq"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_base("dense", str(tmp_path_factory.mktemp("inputs") / "dense"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files for the CLI rows: {name: path}."""
    d = tmp_path_factory.mktemp("input_files")
    out = {"dir": str(d / "a_directory"), "text": str(d / "notes.txt"), "existing_file": str(d / "taken")}
    os.mkdir(out["dir"])
    open(out["text"], "w").write("The patient presented with fever and a cough.\n" * 4)
    open(out["existing_file"], "w").write("not a directory\n")
    records = {
        "prompt-int": {"prompt": 5},
        "prompt-list": {"prompt": ["The", "patient"]},
        "prompt-null": {"prompt": None},
        "ids-string": {"prompt_ids": "1,2,3"},
        "ids-nested": {"prompt_ids": [[1, 2], [3]]},
        "ids-floats": {"prompt_ids": [1, 2.5]},
        "ids-bools": {"prompt_ids": [True, False]},
        "ids-negative": {"prompt_ids": [1, -2]},
        "ids-empty": {"prompt_ids": []},
        "ids-strings": {"prompt_ids": ["1", "2"]},
        "system-int": {"prompt": "hi", "system": 5},
        "neither": {"text": "hi"},
        "number": 5,
    }
    for name, record in records.items():
        path = str(d / f"{name}.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n")
        out[name] = path
    path = str(d / "not-json.jsonl")
    open(path, "w").write('{"prompt": "fine"}\n{prompt\n')
    out["not-json"] = path
    path = str(d / "deep.jsonl")
    open(path, "w").write("[" * 100000 + "]" * 100000 + "\n")
    out["deep"] = path
    return out


# (id, argv with {ckpt} {dense} and {file:NAME}, exit code, substrings of stderr)
CLI_ROWS = [
    ("prompt-file-is-a-directory", ["generate", "{ckpt}", "--prompt-file", "{file:dir}"], 1, ["directory"]),
    ("prompts-file-is-a-directory", ["generate", "{ckpt}", "--prompts-file", "{file:dir}"], 1, ["directory"]),
    ("perplexity-file-is-a-directory", ["perplexity", "{ckpt}", "{file:dir}"], 1, ["directory"]),
    ("score-items-is-a-directory", ["score", "{ckpt}", "{file:dir}"], 1, ["directory"]),
    ("prompt-file-missing", ["generate", "{ckpt}", "--prompt-file", "{file:dir}/nope.txt"], 1, ["not found"]),
    ("checkpoint-is-a-file", ["generate", "{file:text}", "--prompt-ids", "1,2"], 1, ["no such checkpoint"]),
    ("verify-rtol-negative", ["verify", "{ckpt}", "--prompt-ids", "1,2", "--rtol", "-1"], 1, ["--rtol"]),
    ("verify-rtol-nan", ["verify", "{ckpt}", "--prompt-ids", "1,2", "--rtol", "nan"], 1, ["--rtol"]),
    ("verify-rtol-inf", ["verify", "{ckpt}", "--prompt-ids", "1,2", "--rtol", "inf"], 1, ["--rtol"]),
    ("quantize-out-is-a-file", ["quantize", "{dense}", "{file:existing_file}", "--calibration-ids",
                                "{file:text}"], 1, ["not a directory"]),
    ("quantize-out-under-a-file", ["quantize", "{dense}", "{file:existing_file}/sub", "--calibration-ids",
                                   "{file:text}"], 1, ["not a directory"]),
    ("max-memory-inf", ["generate", "{ckpt}", "--prompt-ids", "1,2", "--max-memory", "inf"], 1, ["memory size"]),
    ("max-memory-nan", ["generate", "{ckpt}", "--prompt-ids", "1,2", "--max-memory", "nan"], 1, ["memory size"]),
    ("max-memory-negative", ["generate", "{ckpt}", "--prompt-ids", "1,2", "--max-memory", "-5GB"], 1,
     ["memory size"]),
    ("max-memory-huge", ["generate", "{ckpt}", "--prompt-ids", "1,2", "--max-memory", "9" * 400], 1,
     ["memory size"]),
    ("max-memory-zero", ["generate", "{ckpt}", "--prompt-ids", "1,2", "--max-memory", "0"], 1, ["memory size"]),
    # click's own usage errors keep exit code 2 (and print usage, not a traceback)
    ("usage-max-new-tokens-not-int", ["generate", "{ckpt}", "--prompt-ids", "1,2", "-n", "many"], 2,
     ["Invalid value"]),
    ("usage-unknown-option", ["generate", "{ckpt}", "--prompt-ids", "1,2", "--tempreature", "1"], 2,
     ["No such option"]),
]
CLI_ROWS += [(f"prompts-file-{name}", ["generate", "{ckpt}", "--prompts-file", f"{{file:{name}}}",
                                       "--backend", "numpy"], 1, [f"{name}.jsonl:2"])
             for name in ("prompt-int", "prompt-list", "prompt-null", "ids-string", "ids-nested", "ids-floats",
                          "ids-bools", "ids-negative", "ids-empty", "ids-strings", "system-int", "neither",
                          "number", "not-json")]
CLI_ROWS += [("prompts-file-deep-nesting", ["generate", "{ckpt}", "--prompts-file", "{file:deep}"], 1,
              ["deep.jsonl:1", "JSON"])]


def fill(arg, ckpt, dense, files):
    arg = arg.replace("{ckpt}", ckpt).replace("{dense}", dense)
    if arg.startswith("{file:"):
        name, rest = arg[len("{file:"):].split("}", 1)
        return files[name] + rest
    return arg


@pytest.mark.parametrize("argv, code, needles", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_bad_cli_input_is_one_line(argv, code, needles, ckpt, dense, files):
    p = cli(*[fill(a, ckpt, dense, files) for a in argv], timeout=120)
    if code == 2:                                  # click: "Usage: ..." then "Error: ..."
        assert p.returncode == 2 and "Traceback" not in p.stderr and "Error:" in p.stderr, p.stderr
        assert all(n in p.stderr for n in needles), p.stderr
    else:
        assert_one_line_error(p, needles)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_quantize_refuses_a_file_out_before_calibrating(dense, files):
    t = time.perf_counter()
    p = cli("quantize", dense, files["existing_file"], "--calibration", files["text"])
    assert_one_line_error(p, [files["existing_file"]])
    assert time.perf_counter() - t < 30


# -- chat: an over-long message is refused, the session and its history go on ------------------------------

def chat(ckpt, *lines):
    return cli("chat", ckpt, "--backend", "numpy", "-n", "4", "--greedy", "-q", "--template", "none",
               input="\n".join(lines) + "\n/quit\n", timeout=300)


def test_chat_refuses_an_over_long_message_and_keeps_the_history(ckpt):
    long = " ".join(["fever"] * 2000)
    kept = chat(ckpt, "The patient", long, "was given")
    assert kept.returncode == 0, kept.stderr
    assert "Traceback" not in kept.stderr
    errors = [line for line in kept.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this message alone is" in errors[0] and "context is 512" in errors[0]
    replies = kept.stdout.splitlines()
    assert len(replies) == 2                        # the refused message got no reply, the others did
    # The reply to the third message is the one it gets after the first exchange, without the long message:
    # the history survived the refusal.
    same = chat(ckpt, "The patient", "was given")
    assert same.returncode == 0 and same.stdout.splitlines() == replies


# -- the Python API: only TinyLlamaError subclasses for bad input --------------------------------------------

API_ROWS = [
    ("max_memory-inf", dict(max_memory=float("inf")), MemoryBudgetError, "memory size"),
    ("max_memory-nan", dict(max_memory=float("nan")), MemoryBudgetError, "memory size"),
    ("max_memory-negative", dict(max_memory=-1), MemoryBudgetError, "memory size"),
    ("max_memory-zero", dict(max_memory=0), MemoryBudgetError, "memory size"),
    ("max_memory-bool", dict(max_memory=True), MemoryBudgetError, "memory size"),
    ("max_memory-list", dict(max_memory=[20]), MemoryBudgetError, "memory size"),
    ("max_memory-words", dict(max_memory="lots"), MemoryBudgetError, "memory size"),
    ("max_memory-huge", dict(max_memory=10**30), MemoryBudgetError, "memory size"),
    ("max_memory-one-byte", dict(max_memory=1), MemoryBudgetError, "too small"),
    ("backend-unknown", dict(backend="cuda"), GenerationError, "backend"),
    ("backend-none", dict(backend=None), GenerationError, "backend"),
    ("gptq_mode-unknown", dict(gptq_mode="fast"), ConfigError, "gptq"),
]


@pytest.mark.parametrize("kwargs, error, needle", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_bad_load_arguments(kwargs, error, needle, ckpt):
    with pytest.raises(error) as e:
        tinyllama_ref.load(ckpt, **{"backend": "numpy", **kwargs})
    assert needle in str(e.value).lower()


@pytest.mark.parametrize("path", [None, 5, b"/tmp", "/nonexistent/ckpt", "bad\0path"])
def test_bad_checkpoint_path(path):
    with pytest.raises(CheckpointError):
        tinyllama_ref.load(path, backend="numpy")


def test_tokenizer_refuses_what_is_not_text_or_ids(ckpt):
    tok = tinyllama_ref.load(ckpt, backend="numpy").tokenizer
    for bad in (5, None, [1, 2]):
        with pytest.raises(TokenizerError):
            tok.encode(bad)
    for bad in ("abc", [1.5], [True], [[1]], None):
        with pytest.raises(TokenizerError):
            tok.decode(bad)
    with pytest.raises(TokenizerError):
        tok.check_ids(["1"])


# -- limits: nothing hangs, nothing is sized by a config value alone ------------------------------------------

def test_a_fifo_in_place_of_a_shard_fails_within_a_second(tmp_path):
    d = make_base("sharded", str(tmp_path / "sharded"))
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[1]
    replace_with_fifo(shard)(d)
    code = ("import time, tinyllama_ref\n"
            "t = time.perf_counter()\n"
            "try:\n"
            f"    tinyllama_ref.load({d!r}, backend='numpy')\n"
            "except tinyllama_ref.CheckpointError as e:\n"
            "    print(time.perf_counter() - t, e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    seconds, message = p.stdout.split(" ", 1)
    assert float(seconds) < 1.0 and shard in message and "FIFO" in message


def test_a_billion_layers_are_refused_at_once(ckpt, tmp_path):
    d = copy_base(ckpt, str(tmp_path / "billion"))
    set_key("config.json", "num_hidden_layers", 10**9)(d)
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="num_hidden_layers is 1000000000"):
        tinyllama_ref.load(d, backend="numpy")
    assert time.perf_counter() - t < 1.0


def test_max_position_embeddings_of_1e8_costs_no_memory(ckpt, tmp_path):
    """The RoPE tables and the KV cache are sized by the context used, not by max_position_embeddings."""
    d = copy_base(ckpt, str(tmp_path / "long"))
    set_key("config.json", "max_position_embeddings", 10**8)(d)
    code = ("import tinyllama_ref\n"
            f"m = tinyllama_ref.load({d!r}, backend='numpy')\n"
            "assert m.cfg.max_seq_len == 10**8\n"
            "m.generate([1, 5, 6], max_new_tokens=4)\n"
            "m.generate_text('The patient', max_new_tokens=4)\n"
            "m.perplexity('The patient was given fluids and rest.')\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[-1]) * 1024 < 500 * 10**6
    assert_fine = cli("inspect", d, "--json", timeout=300)
    assert assert_fine.returncode == 0, assert_fine.stderr


def test_inspect_checks_the_g_idx_values_load_leaves_to_the_layer(ckpt, tmp_path):
    from validation_cases import read_header, write_header
    import numpy as np
    d = copy_base(ckpt, str(tmp_path / "gidx"))
    path = os.path.join(d, "model.safetensors")
    header, data = read_header(path)
    name = "model.layers.2.mlp.up_proj.g_idx"
    begin, end = header[name]["data_offsets"]
    g = np.frombuffer(data[begin:end], dtype=np.int32).copy()
    g[7] = 99
    write_header(path, header, data[:begin] + g.tobytes() + data[end:])
    p = cli("inspect", d)
    assert_one_line_error(p, [name, "group 99"])
    with pytest.raises(TinyLlamaError, match="g_idx holds group 99"):
        tinyllama_ref.load(d, backend="numpy").generate([1, 2], max_new_tokens=1)


def test_synth_generation_config_is_greedy(ckpt):
    gen = json.load(open(os.path.join(ckpt, "generation_config.json")))
    assert gen["do_sample"] is False
    one = cli("generate", ckpt, "--prompt", "The patient", "-n", "6", "--backend", "numpy", "-q")
    two = cli("generate", ckpt, "--prompt", "The patient", "-n", "6", "--backend", "numpy", "-q")
    assert one.returncode == 0 and one.stdout == two.stdout


def test_the_pass_reads_headers_not_data(ckpt, dense, monkeypatch):
    """validate_checkpoint never touches tensor bytes (so it costs nothing on a 70B checkpoint)."""
    from tinyllama_ref import checkpoint, validate
    from tinyllama_ref.config import load_config
    from tinyllama_ref.quant import read_quant_config
    for d in (ckpt, dense):
        ck, cfg = checkpoint.Checkpoint(d), load_config(d)
        qc = read_quant_config(d)

        def no_data(self, info):
            raise AssertionError(f"read {info.name}")
        monkeypatch.setattr(checkpoint.SafetensorsFile, "view", no_data)
        t = time.perf_counter()
        assert validate.validate_checkpoint(d, ck, cfg, qc) == 1000
        assert time.perf_counter() - t < 0.5
        monkeypatch.undo()


METHOD_ROWS = [
    ("logits-ragged", lambda m: m.logits([[1, 2], [3]])),
    ("logits-floats", lambda m: m.logits([1.5, 2.0])),
    ("logits-text", lambda m: m.logits("abc")),
    ("logits-past-vocab", lambda m: m.logits([1, 10**6])),
    ("generate-none", lambda m: m.generate(None)),
    ("generate-text", lambda m: m.generate("hello")),
    ("generate-ragged-batch", lambda m: m.generate([[1, 2], [3, "a"]])),
    ("generate-unknown-option", lambda m: m.generate([1, 2], topp=0.5)),
    ("generate-max-new-tokens-string", lambda m: m.generate([1, 2], max_new_tokens="3")),
    ("generate-temperature-string", lambda m: m.generate([1, 2], temperature="hot")),
    ("generate_text-int", lambda m: m.generate_text(5)),
    ("generate_text-none", lambda m: m.generate_text(None)),
    ("generate_text-ids", lambda m: m.generate_text([1, 2])),
    ("generate_text-stop-int", lambda m: m.generate_text("hi", stop=5)),
    ("generate_text-stop-list-of-int", lambda m: m.generate_text("hi", stop=[5])),
    ("generate_text-on_text-not-callable", lambda m: m.generate_text("hi", on_text=5)),
    ("generate_text-template-unknown", lambda m: m.generate_text("hi", template="alpaca")),
    ("perplexity-context-string", lambda m: m.perplexity("The patient was given fluids.", context="4")),
    ("perplexity-context-float", lambda m: m.perplexity("The patient was given fluids.", context=4.5)),
    ("score-none", lambda m: m.score(None)),
    ("score-strings", lambda m: m.score(["abc"])),
]


@pytest.fixture(scope="module")
def loaded(ckpt):
    return tinyllama_ref.load(ckpt, backend="numpy")


@pytest.mark.parametrize("call", [r[1] for r in METHOD_ROWS], ids=[r[0] for r in METHOD_ROWS])
def test_bad_method_arguments_raise_the_family(call, loaded):
    with pytest.raises(TinyLlamaError):
        call(loaded)


def test_a_stop_string_is_one_stop_not_its_characters(loaded):
    free = loaded.generate_text("The patient", max_new_tokens=12, temperature=0.0)
    stop = free.text[4:7]
    assert stop and len(set(stop)) > 0
    cut = loaded.generate_text("The patient", max_new_tokens=12, temperature=0.0, stop=stop)
    listed = loaded.generate_text("The patient", max_new_tokens=12, temperature=0.0, stop=[stop])
    assert cut.text == listed.text
