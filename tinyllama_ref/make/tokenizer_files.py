"""Write a Llama-style tokenizer (tokenizer.model + the Hugging Face JSON files) for synthetic checkpoints.

Nothing is downloaded: a SentencePiece BPE model is trained on pseudo-English, medical-flavoured text made
up here from a seeded random generator, so the same arguments always give the same files.

The trainer settings copy the ones stored inside Llama-2's own tokenizer.model (its trainer_spec and
normalizer_spec): BPE, byte_fallback, split_digits, no text normalisation, whitespace kept as it is, and
ids <unk>=0, <s>=1, </s>=2. With byte_fallback the 256 byte pieces <0x00>..<0xFF> take ids 3..258, as in
Llama, and any character outside the learned pieces is spelled with them.

Added tokens (ChatML's "<|im_start|>", "<|im_end|>") are not SentencePiece pieces: they live only in
added_tokens.json and tokenizer_config.json, with ids that may lie past the model's embedding (Meditron's
GPTQ files list <|im_end|> = 32018 for a 32017-row embedding).
"""

import itertools
import os
import random

from ..errors import TokenizerError
from .files import write_json

# ChatML as Hugging Face chat templates spell it (the Meditron GPTQ card's prompt format).
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "cl", "cr", "dr", "fl", "gr", "ph", "pl", "pr", "sc", "sp", "st", "str", "th", "tr", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ae", "ia", "io", "ou", "ei"]
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "x", "t", "st", "nd", "ct", "ph"]
_MEDICAL = ["patient", "dose", "mg", "hypertension", "insulin", "cardiac", "renal", "therapy", "clinical",
            "diagnosis", "chronic", "acute", "infection", "antibiotic", "symptom", "blood", "pressure",
            "pulmonary", "hepatic", "trial", "study", "treatment", "fever", "pain", "daily", "tablet"]
_GLUE = ["the", "of", "and", "a", "in", "to", "with", "for", "is", "was", "on", "by", "per", "after",
         "before", "may", "should", "not", "or", "at", "this", "that", "were", "are"]
# Some text outside ASCII: common enough to earn pieces (é, µ, β) or rare enough to need byte fallback.
_UNICODE = ["café", "naïve", "Müller", "β-blocker", "µg", "α", "°C", "±", "→", "≤", "Ωmega", "Schrödinger",
            "niño", "façade", "肺炎", "心脏", "Ελληνικά", "Привет", "🙂", "💊", "ﬁ", "日本語"]


def _make_words(rng, n_words):
    """n_words distinct made-up words, each two to four syllables."""
    words, seen = [], set()
    while len(words) < n_words:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(rng.randint(1, 4)))
        if len(w) > 2 and w not in seen:
            seen.add(w)
            words.append(w)
    return words


def generate_text(n_sentences, n_words, seed=0):
    """A list of made-up sentences: Zipf-distributed invented words, medical terms, numbers and unicode."""
    rng = random.Random(seed)
    words = _make_words(rng, n_words)
    # Zipf-like weights so frequent words merge early and rare ones still appear a few times.
    # Cumulative weights, computed once: random.choices would otherwise re-add them on every call.
    cum_weights = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(words))))
    sentences = []
    for _ in range(n_sentences):
        n = rng.randint(6, 18)
        picks = rng.choices(words, cum_weights=cum_weights, k=n)
        for i in range(n):
            r = rng.random()
            if r < 0.25:
                picks[i] = rng.choice(_GLUE)
            elif r < 0.32:
                picks[i] = rng.choice(_MEDICAL)
            elif r < 0.36:
                picks[i] = str(rng.randint(0, 5000))
            elif r < 0.38:
                picks[i] = rng.choice(_UNICODE)
            elif r < 0.42:
                picks[i] = picks[i].capitalize()
        sentence = " ".join(picks)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ";", ":"])
        if rng.random() < 0.05:
            sentence = "  " + sentence          # runs of spaces, kept because whitespace is not normalised
        sentences.append(sentence)
    return sentences


def train_sentencepiece(out_path, vocab_size, seed=0, sentences=None):
    """Train a Llama-like BPE SentencePiece model with exactly `vocab_size` pieces; write it to out_path."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: 3 control pieces and 256 byte pieces "
                             f"come first, ask for at least 300")
    if sentences is None:
        # Enough distinct words that BPE can keep merging until vocab_size pieces exist (measured: about
        # 1.6 distinct words per wanted piece reaches 32000 pieces), but no more text than needed for speed.
        n_words = max(2000, int(vocab_size * 1.6))
        n_sentences = max(3000, int(vocab_size * 2.5))
        sentences = generate_text(n_sentences, n_words, seed)
    model_prefix = out_path[:-len(".model")] if out_path.endswith(".model") else out_path
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=True,              # exactly vocab_size pieces, so ids match the embedding rows
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        character_coverage=0.9995,
        max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_surface=" \u2047 ",
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.remove(model_prefix + ".vocab")
    if model_prefix + ".model" != out_path:
        os.replace(model_prefix + ".model", out_path)
    return out_path


def _token_entry(content, special=True):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def write_tokenizer_files(out_dir, vocab_size, added_tokens=None, seed=0, chat_template=None,
                          legacy=None):
    """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json and added_tokens.json.

    vocab_size: SentencePiece pieces (32000 for Llama-2).
    added_tokens: {text: id} for tokens outside SentencePiece, e.g. {"<|im_start|>": 32017,
        "<|im_end|>": 32018} as in Meditron; ids must not collide with pieces.
    chat_template: a Jinja string for tokenizer_config.json; by default ChatML when "<|im_start|>" and
        "<|im_end|>" are among the added tokens, otherwise none.
    legacy: written as tokenizer_config.json's "legacy" flag when not None (see tokenizer.py).
    Returns the path of tokenizer.model.
    """
    added_tokens = dict(added_tokens or {})
    for text, i in added_tokens.items():
        if not isinstance(i, int) or i < vocab_size:
            raise TokenizerError(f"added token {text!r} has id {i!r}; added token ids must be integers "
                                 f">= the SentencePiece vocab size {vocab_size}")
    if len(set(added_tokens.values())) != len(added_tokens):
        raise TokenizerError(f"added tokens share ids: {added_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    model_path = train_sentencepiece(os.path.join(out_dir, "tokenizer.model"), vocab_size, seed)

    if chat_template is None and {"<|im_start|>", "<|im_end|>"} <= set(added_tokens):
        chat_template = CHATML_JINJA
    decoder = {"0": _token_entry("<unk>"), "1": _token_entry("<s>"), "2": _token_entry("</s>")}
    for text, i in sorted(added_tokens.items(), key=lambda kv: kv[1]):
        decoder[str(i)] = _token_entry(text)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    if legacy is not None:
        config["legacy"] = bool(legacy)
    if chat_template:
        config["chat_template"] = chat_template
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if added_tokens:
        special_map["additional_special_tokens"] = sorted(added_tokens, key=added_tokens.get)
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special_map}
    if added_tokens:
        files["added_tokens.json"] = added_tokens
    for name, data in files.items():
        write_json(os.path.join(out_dir, name), data)
    return model_path
