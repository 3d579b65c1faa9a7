"""Chat templates: turning [{"role": ..., "content": ...}, ...] into the prompt text a model was tuned on.

  chatml  the Meditron GPTQ model card's format (and the ChatML Jinja template in tokenizer_config.json):
              <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
              <|im_start|>assistant\\n
  llama2  Llama-2-chat, as meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template writes it:
              <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
  none    the message contents joined by blank lines: plain text completion.

BOS handling (use `encode_chat`, which applies it):
  - llama2 writes "<s>" into the text before every user turn, as the Hugging Face template does, and the
    tokenizer reads a literal "<s>" as the BOS id; so the text is encoded with add_bos=False.
  - chatml and none have no "<s>" in the text; the BOS id is put in front (add_bos=True), as the Meditron
    card's `tokenizer(prompt_template)` does.
"""

from .errors import GenerationError

TEMPLATES = ("chatml", "llama2", "none")

ROLES = ("system", "user", "assistant")


def _check_messages(messages):
    if not messages:
        raise GenerationError("the conversation is empty; give at least one message")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GenerationError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise GenerationError(f"message {k} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise GenerationError(f"message {k}'s content must be a string, got {type(m['content']).__name__}")


def check_template(template):
    if template not in TEMPLATES:
        raise GenerationError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return template


def render_chatml(messages, add_generation_prompt=True):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def render_llama2(messages, bos="<s>", eos="</s>"):
    """Llama-2-chat. The system message goes inside the first user turn; user and assistant must alternate.
    The text ends with " [/INST]" after a user turn, which is already the generation prompt."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts = []
    for k, m in enumerate(messages):
        if (m["role"] == "user") != (k % 2 == 0):
            raise GenerationError("llama2 template: after an optional system message, roles must alternate "
                                  "user/assistant/user/...")
        content = m["content"]
        if k == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            parts.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            parts.append(f" {content.strip()} {eos}")
    return "".join(parts)


def render_none(messages):
    return "\n\n".join(m["content"] for m in messages)


def render(messages, template, add_generation_prompt=True):
    """The prompt text for messages in the named template ("chatml", "llama2" or "none")."""
    check_template(template)
    _check_messages(messages)
    if template == "chatml":
        return render_chatml(messages, add_generation_prompt)
    if template == "llama2":
        return render_llama2(messages)
    return render_none(messages)


def template_adds_bos(template):
    """True when the rendered text already holds "<s>" (so encode with add_bos=False)."""
    return check_template(template) == "llama2"


def encode_chat(tokenizer, messages, template, add_generation_prompt=True):
    """Prompt ids for messages: render, then encode with the BOS handling described at the top."""
    text = render(messages, template, add_generation_prompt)
    return tokenizer.encode(text, add_bos=not template_adds_bos(template))


def default_template(tokenizer):
    """The template the tokenizer files suggest.

    "chatml" when <|im_start|> and <|im_end|> are added tokens the model can read (ids below the embedding
    size, when known: Meditron's GPTQ files list them at 32017/32018 for a 32017-row embedding, so ChatML
    cannot be the default there; asking for it explicitly gives the tokenizer's clear error). Otherwise
    "llama2" when tokenizer_config.json's chat_template uses [INST]; "chatml" when it uses <|im_start|>
    and the tokenizer has no such added tokens at all; else "none".
    """
    ids = [tokenizer.token_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    limit = tokenizer.vocab_size
    if all(i is not None for i in ids) and (limit is None or max(ids) < limit):
        return "chatml"
    jinja = tokenizer.chat_template or ""
    if isinstance(jinja, list):             # some files hold a list of {"name", "template"} entries
        jinja = " ".join(str(entry.get("template", "")) for entry in jinja if isinstance(entry, dict))
    if "[INST]" in jinja:
        return "llama2"
    if "<|im_start|>" in jinja and all(i is None for i in ids):
        return "chatml"                     # ChatML spelled with ordinary pieces, no added tokens
    return "none"


def stop_strings(template):
    """Strings that end the assistant's turn in this template's format (ChatML: "<|im_end|>")."""
    return ["<|im_end|>"] if check_template(template) == "chatml" else []


def stop_conditions(template, tokenizer):
    """(stop_strings, stop_ids) for a template: generation ends on any of these ids or strings.

    Every template stops on the tokenizer's EOS ids. ChatML also stops at the end of the assistant's turn:
    the id of <|im_end|> when the tokenizer has it, and the string "<|im_end|>" for a model that spells it
    out piece by piece.
    """
    strings = stop_strings(template)
    stop_ids = set(tokenizer.eos_ids)
    for text in strings:
        i = tokenizer.token_id(text)
        if i is not None:
            stop_ids.add(i)
    return strings, stop_ids


class StopStrings:
    """Watch streamed text for stop strings without printing any part of one.

    push(text) -> (printable, stopped). Text that could be the start of a stop string is held back until
    it is known not to be one. When a stop string appears, printable is the text before it and stopped is
    True; nothing after it is ever returned. flush() gives back what is still held at the end.
    """

    def __init__(self, stop_strings):
        self.stops = [s for s in stop_strings if s]
        self.held = ""
        self.stopped = False

    def push(self, text):
        if self.stopped:
            return "", True
        self.held += text
        hits = [self.held.find(s) for s in self.stops if s in self.held]
        if hits:
            self.stopped = True
            out, self.held = self.held[:min(hits)], ""
            return out, True
        # Keep the longest tail of held that is a proper prefix of some stop string.
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:n]):
                    keep = n
                    break
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out, False

    def flush(self):
        out, self.held = ("" if self.stopped else self.held), ""
        return out
