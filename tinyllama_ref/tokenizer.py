"""Text <-> token ids: Llama's SentencePiece model plus the checkpoint's added tokens.

Encoding (what Hugging Face's LlamaTokenizer does):
  1. Cut the text at every added token ("<|im_start|>", "<s>", ...), longest match first. Those pieces
     become their ids directly; SentencePiece never sees them.
  2. Each stretch of ordinary text between them goes through SentencePiece. Llama's tokenizer.model adds a
     "dummy prefix": it turns "Hello" into "▁Hello", as if a space came first.
     - legacy=True (the historical transformers default, and ours when tokenizer_config.json says nothing):
       every stretch gets the dummy prefix, so "<|im_start|>user" encodes "▁user".
     - legacy=False (tokenizer_config.json "legacy": false): only a stretch at the very start of the text
       gets it; "<|im_start|>user" encodes "user" (transformers PR #24565; its tokenizers backend calls
       this Metaspace prepend_scheme="first").
  3. BOS goes in front when asked.

Decoding undoes the pieces: "▁" is a space, except that the very first piece loses the space the dummy prefix
put there; byte-fallback pieces <0xNN> are raw bytes, joined and read as UTF-8, one U+FFFD per byte that is
not part of a valid character (as SentencePiece does). The stream decoder does the same one id at a time and
holds back the bytes of a character that is not complete yet, so a terminal never shows half a character.
"""

import os
import re
from dataclasses import dataclass


from .config import check_regular_file, config_ids, json_type, read_json
from .errors import TokenizerConfigError, TokenizerError
from .sampling import read_generation_config
from .token_ids import as_token_ids, check_token_ids


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before SentencePiece runs (Hugging Face "added token")."""
    text: str
    id: int
    special: bool = True
    lstrip: bool = False      # swallow whitespace on its left when matching
    rstrip: bool = False      # swallow whitespace on its right when matching


TOKENIZER_FILES = ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer's JSON files, read and type-checked (every field here has the type its reader expects)."""
    decoder: dict            # tokenizer_config.json added_tokens_decoder: id -> AddedToken
    added: dict              # added_tokens.json: text -> id
    special_texts: list      # token texts named by special_tokens_map.json and tokenizer_config.json
    bos_text: str = None     # tokenizer_config.json bos_token / eos_token (text)
    eos_text: str = None
    legacy: bool = True
    chat_template: object = None    # a Jinja string, or a list of {"name", "template"} entries


def _token_text(value, path, key):
    """A token spelled as a string or as {"content": ...} (null: none); anything else is an error."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise TokenizerConfigError(f"{path}: {key} is an object without a 'content' string")
    if not isinstance(value, str):
        raise TokenizerConfigError(f"{path}: {key} must be a token string or an object with 'content', found "
                                   f"{json_type(value)} {value!r}")
    return value


def _flag(entry, key, default, path, where):
    value = entry.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerConfigError(f"{path}: {where} {key} must be true or false, found {value!r}")
    return value


def read_tokenizer_files(checkpoint_dir):
    """TokenizerFiles from tokenizer_config.json, added_tokens.json and special_tokens_map.json (each optional).

    Wrong JSON types, ids that are not integers >= 0 and entries without a content string are
    TokenizerConfigError (a TokenizerError and a ConfigError) naming the file and the key.
    """
    paths = {name: os.path.join(checkpoint_dir, name) for name in TOKENIZER_FILES}
    config, added_json, special_map = (read_json(paths[n], TokenizerConfigError, optional=True) or {}
                                       for n in TOKENIZER_FILES)
    cpath, apath, spath = (paths[n] for n in TOKENIZER_FILES)

    decoder_raw = config.get("added_tokens_decoder")
    if decoder_raw is None:
        decoder_raw = {}
    if not isinstance(decoder_raw, dict):
        raise TokenizerConfigError(f"{cpath}: added_tokens_decoder must be an object of id -> token, found "
                                   f"{json_type(decoder_raw)}")
    decoder = {}
    for key, entry in decoder_raw.items():
        where = f"added_tokens_decoder[{key!r}]"
        if not (key.isascii() and key.isdigit()):
            raise TokenizerConfigError(f"{cpath}: {where}: the key must be a token id (an integer >= 0)")
        if not isinstance(entry, dict):
            raise TokenizerConfigError(f"{cpath}: {where} must be an object with 'content', found "
                                       f"{json_type(entry)}")
        text = entry.get("content")
        if not isinstance(text, str) or not text:
            raise TokenizerConfigError(f"{cpath}: {where} has no 'content' string (found {text!r})")
        decoder[int(key)] = AddedToken(text, int(key), special=_flag(entry, "special", True, cpath, where),
                                       lstrip=_flag(entry, "lstrip", False, cpath, where),
                                       rstrip=_flag(entry, "rstrip", False, cpath, where))

    added = {}
    for text, i in added_json.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise TokenizerConfigError(f"{apath}: {text!r} must map to a token id (an integer >= 0), found "
                                       f"{json_type(i)} {i!r}")
        if not text:
            raise TokenizerConfigError(f"{apath}: an empty string cannot be an added token")
        added[text] = i

    special = [_token_text(special_map.get(k), spath, k) for k in ("bos_token", "eos_token", "unk_token",
                                                                    "pad_token")]
    special += [_token_text(config.get(k), cpath, k) for k in ("bos_token", "eos_token", "unk_token")]
    extra = special_map.get("additional_special_tokens")
    if extra is not None and not isinstance(extra, list):
        raise TokenizerConfigError(f"{spath}: additional_special_tokens must be a list of tokens, found "
                                   f"{json_type(extra)}")
    special += [_token_text(v, spath, f"additional_special_tokens[{k}]") for k, v in enumerate(extra or [])]

    legacy = config.get("legacy")
    if legacy is not None and not isinstance(legacy, bool):
        raise TokenizerConfigError(f"{cpath}: legacy must be true, false or null, found {legacy!r}")
    template = config.get("chat_template")
    if not (template is None or isinstance(template, str) or (
            isinstance(template, list) and all(isinstance(e, dict) and isinstance(e.get("template"), str)
                                               for e in template))):
        raise TokenizerConfigError(f"{cpath}: chat_template must be a Jinja string or a list of "
                                   "{\"name\", \"template\"} objects")
    return TokenizerFiles(decoder=decoder, added=added, special_texts=[t for t in special if t],
                          bos_text=_token_text(config.get("bos_token"), cpath, "bos_token"),
                          eos_text=_token_text(config.get("eos_token"), cpath, "eos_token"),
                          legacy=legacy is not False, chat_template=template)


def _load_sentencepiece(path):
    import sentencepiece as spm

    if not os.path.exists(path):
        raise TokenizerError(f"{path}: file not found; a Llama checkpoint needs its SentencePiece "
                             f"tokenizer.model next to config.json")
    check_regular_file(path, TokenizerError, "SentencePiece tokenizer.model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({str(e).strip()}); "
                             f"download tokenizer.model again") from None
    return sp


def read_added_tokens(checkpoint_dir, sp, files=None):
    """The added tokens named by the checkpoint's JSON files, as {text: AddedToken}.

    Sources, later ones filling gaps: tokenizer_config.json's added_tokens_decoder (ids with flags),
    added_tokens.json ({text: id}), special_tokens_map.json (texts only; the id must come from the others or
    from a SentencePiece piece of the same text). bos/eos/unk are added tokens too, as in transformers, so a
    literal "<s>" in the text becomes id 1.
    """
    files = files or read_tokenizer_files(checkpoint_dir)
    tokens = {}

    def add(text, i, where, **flags):
        if text in tokens and tokens[text].id != i:
            raise TokenizerError(f"{checkpoint_dir}: {where} gives {text!r} id {i}, but another tokenizer "
                                 f"file gives it id {tokens[text].id}; the files disagree")
        if text not in tokens:
            tokens[text] = AddedToken(text, i, **flags)

    for i, t in files.decoder.items():
        add(t.text, i, "tokenizer_config.json added_tokens_decoder", special=t.special, lstrip=t.lstrip,
            rstrip=t.rstrip)
    for text, i in files.added.items():
        add(text, i, "added_tokens.json")
    for text in files.special_texts:
        if text in tokens:
            continue
        i = sp.piece_to_id(text)
        if i != sp.unk_id() or text == sp.id_to_piece(sp.unk_id()):
            add(text, i, "special_tokens_map.json")
    # Without any JSON files, transformers still treats "<unk>", "<s>", "</s>" as special tokens.
    for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()):
        if i >= 0 and sp.id_to_piece(i) not in tokens:
            add(sp.id_to_piece(i), i, "tokenizer.model")
    return tokens


class Tokenizer:
    """SentencePiece plus added tokens; build it with Tokenizer.from_dir(checkpoint_dir)."""

    def __init__(self, sp, added_tokens=(), bos_id=None, eos_ids=None, vocab_size=None, legacy=True,
                 chat_template=None, path=None):
        self.sp = sp
        self.path = path
        self.legacy = legacy
        self.chat_template = chat_template       # tokenizer_config.json's Jinja string, if any
        self.vocab_size = vocab_size             # rows of the model's embedding (None: not known)
        self.n_sp = sp.get_piece_size()
        self.added = {t.text: t for t in added_tokens}
        self.added_by_id = {t.id: t for t in added_tokens}
        self.bos_id = sp.bos_id() if bos_id is None else bos_id
        self.eos_ids = set(eos_ids) if eos_ids else {sp.eos_id()}
        self.eos_id = min(self.eos_ids)
        # One regex that finds any added token, longest first so "<|im_start|>" wins over a shorter
        # token that is its prefix (Hugging Face uses a leftmost-longest trie for the same effect).
        texts = sorted(self.added, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in texts)) if texts else None
        self._sp_no_prefix = None                 # built on first use (legacy=False only)
        self.unk_surface = sp.decode([sp.unk_id()])   # " ⁇ " unless the model was trained with another

    @classmethod
    def from_dir(cls, checkpoint_dir, vocab_size=None):
        """Read tokenizer.model and the JSON files beside it; vocab_size is the embedding's row count."""
        files = read_tokenizer_files(checkpoint_dir)
        gen = read_generation_config(checkpoint_dir)
        sp = _load_sentencepiece(os.path.join(checkpoint_dir, "tokenizer.model"))
        added = read_added_tokens(checkpoint_dir, sp, files)
        config_path = os.path.join(checkpoint_dir, "config.json")
        model_config = read_json(config_path, optional=True) or {}
        # BOS / EOS: generation_config.json first (what generate() uses), then config.json, then the
        # tokenizer's own bos_token / eos_token strings, then SentencePiece's ids.
        bos = gen.get("bos_token_id") or config_ids(model_config, "bos_token_id", config_path)
        eos_ids = set(gen.get("eos_token_id") or config_ids(model_config, "eos_token_id", config_path))
        if files.eos_text in added:
            eos_ids.add(added[files.eos_text].id)
        if bos:
            bos_id = bos[0]
        else:
            bos_id = added[files.bos_text].id if files.bos_text in added else sp.bos_id()
        return cls(sp, list(added.values()), bos_id=int(bos_id), eos_ids=eos_ids or {sp.eos_id()},
                   vocab_size=vocab_size, legacy=files.legacy,   # absent/null: legacy
                   chat_template=files.chat_template, path=checkpoint_dir)

    # ---- sizes and names ----

    @property
    def n_vocab(self):
        """Distinct token ids this tokenizer knows: SentencePiece pieces plus added tokens beyond them."""
        return self.n_sp + sum(1 for i in self.added_by_id if i >= self.n_sp)

    def id_to_piece(self, i):
        """The token's text as stored: an added token's content or a SentencePiece piece like '▁the'."""
        if i in self.added_by_id:
            return self.added_by_id[i].text
        if 0 <= i < self.n_sp:
            return self.sp.id_to_piece(i)
        raise TokenizerError(f"token id {i} is not in the tokenizer (SentencePiece has {self.n_sp} pieces, "
                             f"added tokens are {sorted(self.added_by_id)})")

    def token_id(self, text):
        """The id of an added token or a whole SentencePiece piece, or None."""
        if text in self.added:
            return self.added[text].id
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i

    def check_ids(self, ids):
        """Refuse ids the model cannot embed (at or past vocab_size), naming the token (token_ids.py)."""
        limit = self.vocab_size
        if limit is None:                        # model size unknown: every id the tokenizer names is fine
            limit = max(self.n_sp, max(self.added_by_id, default=0) + 1)
        check_token_ids(ids, limit, TokenizerError, name=self._describe_id)
        return ids

    def _describe_id(self, i):
        try:
            return repr(self.id_to_piece(i))
        except TokenizerError:
            return "no token"

    # ---- encoding ----

    def split_added(self, text):
        """Cut text at added tokens: a list of str (ordinary text) and AddedToken, in order."""
        if self._added_re is None:
            return [text] if text else []
        parts, start = [], 0
        for m in self._added_re.finditer(text):
            parts.append(text[start:m.start()])
            parts.append(self.added[m.group()])
            start = m.end()
        parts.append(text[start:])
        # lstrip / rstrip flags: the token swallows the whitespace beside it (tokenizers' AddedToken).
        for k, part in enumerate(parts):
            if isinstance(part, AddedToken):
                if part.lstrip and k > 0:
                    parts[k - 1] = parts[k - 1].rstrip()
                if part.rstrip and k + 1 < len(parts):
                    parts[k + 1] = parts[k + 1].lstrip()
        return [p for p in parts if not (isinstance(p, str) and p == "")]

    def _encode_plain(self, text, dummy_prefix):
        """SentencePiece ids for ordinary text, with or without Llama's leading '▁'."""
        if dummy_prefix:
            return self.sp.encode(text)
        if self._sp_no_prefix is None:
            # SentencePiece has no per-call switch for the dummy prefix, so load a second copy of the model
            # with normalizer_spec.add_dummy_prefix = false. Protobuf merges a message field that appears
            # twice, so appending one more normalizer_spec holding only that flag overrides it:
            # 0x1A = field 3 (ModelProto.normalizer_spec), length-delimited; 0x02 = 2 bytes follow;
            # 0x18 = field 3 (NormalizerSpec.add_dummy_prefix), varint; 0x00 = false.
            import sentencepiece as spm
            self._sp_no_prefix = spm.SentencePieceProcessor()
            no_prefix = self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00"
            self._sp_no_prefix.load_from_serialized_proto(no_prefix)
        return self._sp_no_prefix.encode(text)

    def encode(self, text, add_bos=True):
        """Token ids for text: added tokens matched first, the rest through SentencePiece.

        add_bos puts the BOS id in front, unless the text itself starts with the BOS token ("<s>", as the
        llama2 chat template writes): a doubled BOS is never what a caller wants. (transformers would
        double it; llama.cpp warns about it.)
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        parts = self.split_added(text)
        starts_with_bos = bool(parts) and isinstance(parts[0], AddedToken) and parts[0].id == self.bos_id
        ids = [self.bos_id] if add_bos and not starts_with_bos else []
        for k, part in enumerate(parts):
            if isinstance(part, AddedToken):
                ids.append(part.id)
            else:
                ids.extend(self._encode_plain(part, dummy_prefix=self.legacy or k == 0))
        return ids

    # ---- decoding ----

    def stream_decoder(self, skip_special_tokens=False, context_ids=()):
        """A StreamDecoder: push ids one at a time, get back only complete characters.

        context_ids (usually the prompt) are pushed first and their text thrown away, so the first new
        token is decoded as a continuation: after the prompt "The patient", "▁received" prints
        " received", not "received" as it would at the very start of a text.
        """
        stream = StreamDecoder(self, skip_special_tokens)
        for i in context_ids:
            stream.push(i)
        return stream

    def decode(self, ids, skip_special_tokens=False):
        """Text for ids. Control tokens (<s>, </s>) give no text; other added tokens give their own text
        unless skip_special_tokens drops the special ones; ids that name no token give no text."""
        ids = as_token_ids(ids, TokenizerError)
        stream = self.stream_decoder(skip_special_tokens)
        return "".join(stream.push(i) for i in ids) + stream.flush()


def _utf8_length(lead):
    """Bytes in the UTF-8 sequence that starts with byte `lead`, or 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def decode_utf8_prefix(buf, final):
    """Read bytes as UTF-8: (text, bytes used). Each byte that does not belong to a valid character becomes
    U+FFFD, as in SentencePiece. When not final, an incomplete character at the end is left unread."""
    out, i = [], 0
    while i < len(buf):
        n = _utf8_length(buf[i])
        if n and i + n > len(buf):                   # the character runs past the bytes we have
            if not final and all(0x80 <= b <= 0xBF for b in buf[i + 1:]):
                break                                # its remaining bytes may still come
            n = 0
        char = None
        if n:
            try:
                char = bytes(buf[i:i + n]).decode("utf-8")
            except UnicodeDecodeError:               # bad continuation, overlong form or surrogate
                pass
        if char is None:
            out.append("\ufffd")
            i += 1
        else:
            out.append(char)
            i += n
    return "".join(out), i


class StreamDecoder:
    """Decode one token id at a time; the pushes joined, plus flush(), equal Tokenizer.decode(all ids).

    Two things need memory between tokens:
      - whether any text has come out yet (the first piece's '▁' is the dummy prefix, not a space);
      - bytes from <0xNN> pieces that do not yet make a whole UTF-8 character (an emoji is 4 pieces).
    """

    def __init__(self, tokenizer, skip_special_tokens=False):
        self.tok = tokenizer
        self.skip_special = skip_special_tokens
        self.pending = bytearray()   # bytes of an unfinished run of byte-fallback pieces
        self.at_start = True         # no piece has produced text yet

    def _end_byte_run(self):
        """A non-byte piece ends a run of bytes: whatever is left can never complete."""
        text, _ = decode_utf8_prefix(self.pending, final=True)
        self.pending.clear()
        return text

    def push(self, token_id):
        """The new printable text that token_id adds (maybe '')."""
        tok, sp = self.tok, self.tok.sp
        if token_id in tok.added_by_id and token_id >= tok.n_sp:   # beyond SentencePiece: <|im_end|>
            added = tok.added_by_id[token_id]
            if added.special and self.skip_special:
                return ""
            self.at_start = False
            return self._end_byte_run() + added.text
        if not 0 <= token_id < tok.n_sp or sp.is_control(token_id):
            return ""                                 # <s>, </s>, or an id with no token at all
        if sp.is_byte(token_id):
            self.pending.append(int(sp.id_to_piece(token_id)[3:5], 16))    # "<0xE2>" -> 0xE2
            text, used = decode_utf8_prefix(self.pending, final=False)
            del self.pending[:used]
            self.at_start = False
            return text
        text = self._end_byte_run()
        if sp.is_unknown(token_id):
            piece = tok.unk_surface
        else:
            piece = sp.id_to_piece(token_id).replace("\u2581", " ")
            if self.at_start and piece.startswith(" "):
                piece = piece[1:]                     # the dummy prefix SentencePiece added when encoding
        self.at_start = False
        return text + piece

    def flush(self):
        """Text still held back at the end (an unfinished character comes out as U+FFFD per byte)."""
        return self._end_byte_run()
