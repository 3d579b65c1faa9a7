"""Tokenizer: compared with the sentencepiece library and with transformers' LlamaTokenizer."""

import json
import random

import pytest
import sentencepiece as spm

from tinyllama_ref.errors import TokenizerError
from tinyllama_ref.tokenizer import Tokenizer
from tinyllama_ref.make.tokenizer_files import generate_text, write_tokenizer_files

SP_SIZE = 1000
# Meditron's layout scaled down: the embedding has 1017 rows, <|im_start|> is row 1017 and <|im_end|> 1018,
# so neither fits, and ids 1000..1016 are embedding rows that no token names.
MEDITRON_ADDED = {"<|im_start|>": 1017, "<|im_end|>": 1018}
# For transformers, whose added tokens must follow the vocabulary without gaps.
CONTIGUOUS_ADDED = {"<|im_start|>": 1000, "<|im_end|>": 1001}

UNSEEN = "𝔘ঞ\u0b85"          # characters absent from the training text: byte fallback only


@pytest.fixture(scope="module")
def meditron_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_meditron")
    write_tokenizer_files(str(out), SP_SIZE, MEDITRON_ADDED, seed=11)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


@pytest.fixture(scope="module")
def contiguous_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_contiguous")
    write_tokenizer_files(str(out), SP_SIZE, CONTIGUOUS_ADDED, seed=11)
    return out


@pytest.fixture(scope="module")
def sp(contiguous_dir):
    return spm.SentencePieceProcessor(model_file=str(contiguous_dir / "tokenizer.model"))


def sample_texts():
    texts = generate_text(60, 2000, seed=99)
    texts += ["Hello café 🙂 naïve", f"unseen {UNSEEN} chars", "tabs\tand\nnewlines\n\n", "x", "µg 40 ± 2 °C",
              "日本語のテキスト", "emoji 💊💊 pills", "a  b   c", "ﬁne ligature"]
    return texts


def hf_llama_tokenizer(sp, legacy):
    """transformers' LlamaTokenizer over the same vocabulary (without protobuf, so built from pieces)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=legacy)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, normalized=False, special=True) for t in sorted(CONTIGUOUS_ADDED, key=CONTIGUOUS_ADDED.get)]})
    assert tok.convert_tokens_to_ids("<|im_end|>") == CONTIGUOUS_ADDED["<|im_end|>"]
    return tok


# ---- loading ----

def test_from_dir_reads_ids_and_added_tokens(meditron_dir):
    tok = Tokenizer.from_dir(str(meditron_dir), vocab_size=1017)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, {2})
    assert tok.n_vocab == SP_SIZE + 2
    assert tok.id_to_piece(1018) == "<|im_end|>" and tok.id_to_piece(1) == "<s>"
    assert tok.token_id("<|im_start|>") == 1017 and tok.token_id("no such piece") is None
    assert tok.legacy is True                      # tokenizer_config.json has no "legacy" key


def test_older_layouts_without_added_tokens_decoder(tmp_path):
    write_tokenizer_files(str(tmp_path), 400, {"<|im_start|>": 400, "<|im_end|>": 401})
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(str(tmp_path))                  # ids from added_tokens.json alone
    assert tok.encode("<|im_end|><s>", add_bos=False) == [401, 1]
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (tmp_path / name).unlink()
    tok = Tokenizer.from_dir(str(tmp_path))                  # tokenizer.model alone
    assert tok.encode("</s>", add_bos=False) == [2] and tok.n_vocab == 400
    assert tok.token_id("<|im_end|>") is None


def test_eos_ids_from_generation_config_list(tmp_path):
    write_tokenizer_files(str(tmp_path), 400, {"<|im_end|>": 400})
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 400]}))
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.eos_ids == {2, 400}


def test_missing_and_corrupt_model_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model: file not found"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.from_dir(str(tmp_path))


def test_disagreeing_files_are_refused(tmp_path):
    write_tokenizer_files(str(tmp_path), 400, {"<|im_end|>": 401})
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 405}))
    with pytest.raises(TokenizerError, match="disagree"):
        Tokenizer.from_dir(str(tmp_path))


# ---- encoding ----

def test_plain_text_matches_sentencepiece(contiguous_dir, sp):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    for text in sample_texts():
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, add_bos=False) == sp.encode(text)


def test_unseen_characters_use_byte_fallback(contiguous_dir, sp):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    ids = tok.encode("𝔘", add_bos=False)
    # "▁" then the four bytes of U+1D518 (F0 9D 94 98): byte <0xNN> has id 3 + NN.
    assert [tok.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    assert ids[1:] == [3 + 0xF0, 3 + 0x9D, 3 + 0x94, 3 + 0x98]


def test_added_tokens_are_cut_out_before_sentencepiece(meditron_dir):
    tok = Tokenizer.from_dir(str(meditron_dir))
    sp = tok.sp
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)
    # legacy: each stretch of text is encoded on its own, with SentencePiece's dummy prefix.
    assert ids == [1017] + sp.encode("user\nhi") + [1018]
    # A literal "<s>" is the BOS token, as in transformers.
    assert tok.encode("<s>a</s>", add_bos=False) == [1] + sp.encode("a") + [2]
    # Text that already starts with "<s>" gets no second BOS.
    assert tok.encode("<s>a") == tok.encode("<s>a", add_bos=False) == [1] + sp.encode("a")
    assert tok.encode(" <s>a")[:2] == [1, sp.encode(" ")[0]]
    # Longest match: "<|im_end|>" is not read as "<|im_end" + "|>".
    assert tok.encode("x<|im_end|>", add_bos=False)[-1] == 1018


def test_non_legacy_drops_dummy_prefix_after_added_tokens(tmp_path):
    write_tokenizer_files(str(tmp_path), SP_SIZE, CONTIGUOUS_ADDED, seed=11, legacy=False)
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.legacy is False
    ids = tok.encode("hi<|im_start|>user", add_bos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[0].startswith("▁")                         # start of the text: prefix as usual
    after = pieces[pieces.index("<|im_start|>") + 1:]
    assert "".join(after) == "user"                          # no "▁" in front of "user"


def test_lstrip_rstrip_flags(tmp_path):
    write_tokenizer_files(str(tmp_path), 400, {"<X>": 400})
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["400"].update(lstrip=True, rstrip=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.encode("a  <X>  b", add_bos=False) == tok.encode("a<X>b", add_bos=False)


@pytest.mark.parametrize("legacy", [True, False])
def test_encode_decode_match_transformers_llama_tokenizer(contiguous_dir, sp, legacy):
    hf = hf_llama_tokenizer(sp, legacy)
    tok = Tokenizer.from_dir(str(contiguous_dir))
    tok.legacy = legacy
    checked = 0
    for text in sample_texts():
        for s in (text, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{text}"):
            if s.startswith(" "):
                # transformers' Metaspace does not add "▁" to text that already starts with a space;
                # SentencePiece (and so this tokenizer) does. tokenizer.model is the reference here.
                continue
            ids = tok.encode(s, add_bos=False)
            assert ids == hf.encode(s, add_special_tokens=False), s
            assert tok.decode(ids) == hf.decode(ids), s
            assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), s
            checked += 1
    assert checked > 100


# ---- decoding ----

def test_decode_matches_sentencepiece_on_random_ids(contiguous_dir, sp):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    rng = random.Random(0)
    for _ in range(1500):
        # Plenty of byte pieces (ids 3..258) so invalid and unfinished UTF-8 runs are common.
        ids = [rng.randrange(3, 259) if rng.random() < 0.6 else rng.randrange(SP_SIZE)
               for _ in range(rng.randint(1, 10))]
        assert tok.decode(ids) == sp.decode(ids), ids


def test_decode_hand_cases(contiguous_dir):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    b = lambda byte: 3 + byte                              # noqa: E731  byte piece id
    sp = tok.sp
    hello = sp.piece_to_id("▁c")
    assert tok.decode([hello]) == "c"                      # the first piece's "▁" is the dummy prefix
    assert tok.decode([1, hello]) == "c"                   # BOS gives no text and is not "first"
    assert tok.decode([b(0x41), hello]) == "A c"           # not first any more: the space stays
    assert tok.decode([b(0xC3), b(0xA9)]) == "é"
    assert tok.decode([b(0xE2), b(0x82)]) == "\ufffd\ufffd"          # unfinished: one U+FFFD per byte
    assert tok.decode([b(0xC3), b(0x28)]) == "\ufffd("              # bad continuation byte
    assert tok.decode([b(0xED), b(0xA0), b(0x80)]) == "\ufffd" * 3  # a UTF-16 surrogate is not UTF-8
    assert tok.decode([0, hello]) == " \u2047  c"          # <unk> shows as " ⁇ " like SentencePiece
    assert tok.decode([1001]) == "<|im_end|>" and tok.decode([1001], skip_special_tokens=True) == ""
    assert tok.decode([1500]) == ""                        # an id no token names gives no text


def test_stream_decoder_never_emits_half_a_character(contiguous_dir):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    text = f"Le café 🙂 {UNSEEN} 💊 ok"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text == tok.decode(ids)
    for piece in pieces:
        assert "\ufffd" not in piece
        assert piece.encode("utf-8").decode("utf-8") == piece       # whole characters only
    # The 4 byte pieces of 𝔘 print nothing until the last one completes the character.
    four = [3 + x for x in "𝔘".encode("utf-8")]
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in four] == ["", "", "", "𝔘"]


def test_stream_after_a_prompt_continues_it(contiguous_dir):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    prompt = tok.encode("The patient")
    generated = tok.encode("received insulin", add_bos=False)        # starts with a "▁re..." piece
    assert tok.id_to_piece(generated[0]).startswith("▁")
    fresh = tok.stream_decoder()
    assert fresh.push(generated[0]) == tok.id_to_piece(generated[0])[1:]   # at the start: no space
    stream = tok.stream_decoder(context_ids=prompt)
    text = "".join(stream.push(i) for i in generated) + stream.flush()
    assert text == tok.decode(prompt + generated)[len(tok.decode(prompt)):]
    assert text.startswith(" ")


def test_stream_pushes_equal_decode_on_random_ids(contiguous_dir):
    tok = Tokenizer.from_dir(str(contiguous_dir))
    rng = random.Random(1)
    for _ in range(500):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(1002), 1000, 1001, 1])
               for _ in range(rng.randint(1, 12))]
        stream = tok.stream_decoder()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


# ---- ids the model cannot read ----

def test_ids_past_the_embedding_name_the_token(meditron_dir):
    tok = Tokenizer.from_dir(str(meditron_dir), vocab_size=1017)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    with pytest.raises(TokenizerError, match=r"token id 1017 \('<\|im_start\|>'\) is past the model's "
                                             r"1017-row embedding; this checkpoint cannot read it"):
        tok.check_ids(ids)
    assert tok.check_ids(tok.encode("plain text")) == tok.encode("plain text")
    with pytest.raises(TokenizerError, match="1018.*<\\|im_end\\|>"):
        tok.check_ids([5, 1018])
    with pytest.raises(TokenizerError, match="negative"):
        tok.check_ids([-1])
    with pytest.raises(TokenizerError, match="not in the tokenizer"):
        tok.id_to_piece(1005)
