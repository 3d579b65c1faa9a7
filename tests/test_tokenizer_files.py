"""write_tokenizer_files: a Llama-like SentencePiece model and Hugging Face JSON files, made offline."""

import json
import os

import pytest
import sentencepiece as spm

from tinyllama_ref.errors import TokenizerError
from tinyllama_ref.make.tokenizer_files import CHATML_JINJA, generate_text, write_tokenizer_files

MEDITRON_ADDED = {"<|im_start|>": 1017, "<|im_end|>": 1018}   # the Meditron layout, scaled down


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_files")
    write_tokenizer_files(str(out), 1000, MEDITRON_ADDED, seed=3)
    return out


def test_model_has_exactly_the_requested_pieces_in_llama_layout(chatml_dir):
    sp = spm.SentencePieceProcessor(model_file=str(chatml_dir / "tokenizer.model"))
    assert sp.get_piece_size() == 1000
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    # Llama puts the 256 byte-fallback pieces right after the three control pieces.
    assert [sp.id_to_piece(i) for i in (3, 4, 13, 258)] == ["<0x00>", "<0x01>", "<0x0A>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(3, 259)) and not sp.is_byte(259)


def test_model_keeps_whitespace_splits_digits_and_falls_back_to_bytes(chatml_dir):
    sp = spm.SentencePieceProcessor(model_file=str(chatml_dir / "tokenizer.model"))
    pieces = sp.encode("dose 2024\n\tx", out_type=str)
    assert "<0x0A>" in pieces and "<0x09>" in pieces          # no normalisation of \n or \t
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["2", "0", "2", "4"]   # split_digits
    # A character never seen in training (U+1D518) is spelled as its 4 UTF-8 bytes.
    pieces = sp.encode("\U0001D518", out_type=str)
    assert pieces[-4:] == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    text = "  two  spaces, naïve café 𝔘 \n end"
    assert sp.decode(sp.encode(text)) == text                  # lossless round trip


def test_json_files_follow_meditron(chatml_dir):
    added = json.loads((chatml_dir / "added_tokens.json").read_text())
    assert added == MEDITRON_ADDED
    config = json.loads((chatml_dir / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert {k: v["content"] for k, v in decoder.items()} == {
        "0": "<unk>", "1": "<s>", "2": "</s>", "1017": "<|im_start|>", "1018": "<|im_end|>"}
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["chat_template"] == CHATML_JINJA
    special = json.loads((chatml_dir / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_chat_template_renders_like_the_model_card(chatml_dir):
    jinja2 = pytest.importorskip("jinja2")
    config = json.loads((chatml_dir / "tokenizer_config.json").read_text())
    text = jinja2.Template(config["chat_template"]).render(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_no_added_tokens_means_no_chat_template_and_no_added_tokens_file(tmp_path):
    write_tokenizer_files(str(tmp_path), 400, seed=1)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    assert not (tmp_path / "added_tokens.json").exists()
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size() == 400


def test_same_seed_same_vocabulary(tmp_path):
    # (The .model bytes also record the output path, so compare the pieces and their scores.)
    vocabularies = []
    for name in ("a", "b"):
        write_tokenizer_files(str(tmp_path / name), 500, {"<|im_end|>": 500}, seed=7)
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / name / "tokenizer.model"))
        vocabularies.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(500)])
    assert vocabularies[0] == vocabularies[1]


def test_generated_text_is_deterministic_and_varied():
    a, b = generate_text(300, 500, seed=4), generate_text(300, 500, seed=4)
    assert a == b and a != generate_text(300, 500, seed=5)
    words = {w for s in a for w in s.split()}
    assert len(words) > 400
    assert any(ord(c) > 127 for s in a for c in s)             # some unicode in the training text


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(TokenizerError, match="at least 300"):
        write_tokenizer_files(str(tmp_path / "small"), 100)
    with pytest.raises(TokenizerError, match="collide|>= the SentencePiece vocab size"):
        write_tokenizer_files(str(tmp_path / "clash"), 500, {"<|im_end|>": 20})
    assert not os.path.exists(tmp_path / "clash" / "tokenizer.model")


def test_llama_sized_vocab_trains_quickly(tmp_path):
    """The 70B synthetic checkpoint needs 32000 pieces (measured: about 5 s on 2 cores)."""
    import time
    start = time.perf_counter()
    write_tokenizer_files(str(tmp_path), 32000, {"<|im_start|>": 32017, "<|im_end|>": 32018})
    assert time.perf_counter() - start < 120
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.get_piece_size() == 32000
