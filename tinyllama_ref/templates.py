"""Chat templates: turning [{"role": ..., "content": ...}, ...] into the prompt text a model was tuned on.

  checkpoint  tokenizer_config.json's own "chat_template" (Jinja), rendered as transformers renders it
              (render_jinja below); the default whenever the checkpoint has one. The three built-ins below
              are for checkpoints without one:
  chatml  the Meditron GPTQ model card's format (and the ChatML Jinja template in tokenizer_config.json):
              <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
              <|im_start|>assistant\\n
  llama2  Llama-2-chat, as meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template writes it:
              <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
  none    the message contents joined by blank lines: plain text completion.

BOS handling (use `encode_chat`, which applies it):
  - checkpoint: the template writes BOS itself if the model wants it ({{ bos_token }}), so the text is
    encoded with add_bos=False, as transformers' apply_chat_template(tokenize=True) does.
  - llama2 writes "<s>" into the text before every user turn, as the Hugging Face template does, and the
    tokenizer reads a literal "<s>" as the BOS id; so the text is encoded with add_bos=False.
  - chatml and none have no "<s>" in the text; the BOS id is put in front (add_bos=True), as the Meditron
    card's `tokenizer(prompt_template)` does.
"""

import json
import os
from functools import lru_cache

from .errors import GenerationError, TokenizerConfigError

TEMPLATES = ("checkpoint", "chatml", "llama2", "none")

# transformers' continue_final_message marker: appended to the last message, the text is cut where it lands.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(TokenizerConfigError, GenerationError):
    """tokenizer_config.json's chat_template is not valid Jinja, or it refused the conversation
    (raise_exception): a config error and a bad-input error at once."""


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


def render(messages, template, add_generation_prompt=True, tokenizer=None, continue_final_message=False):
    """The prompt text for messages in the named template ("checkpoint", "chatml", "llama2" or "none").

    tokenizer: needed for "checkpoint" (its tokenizer_config.json template and token strings).
    continue_final_message: end the text right after the last message's content, so the model continues
    that message (transformers' option of the same name, which lm-eval's hf backend uses).
    """
    check_template(template)
    _check_messages(messages)
    if continue_final_message:
        # As transformers: mark the end of the last message, render, and cut at the mark.
        messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + CONTINUE_TAG}]
    if template == "checkpoint":
        if tokenizer is None:
            raise GenerationError("the checkpoint's chat template needs its tokenizer: render(..., tokenizer=)")
        text = render_jinja(tokenizer, messages, add_generation_prompt)
    elif template == "chatml":
        text = render_chatml(messages, add_generation_prompt)
    elif template == "llama2":
        text = render_llama2(messages)
    else:
        text = render_none(messages)
    if continue_final_message:
        at = text.rfind(CONTINUE_TAG.strip())
        if at < 0:
            raise GenerationError(f"the {template} template dropped the last message's text, so it cannot be "
                                  "continued")
        text = text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()
    return text


def template_adds_bos(template):
    """True when the template writes BOS into the text itself (so encode with add_bos=False): llama2's
    "<s>", and a checkpoint's Jinja template, which writes {{ bos_token }} when its model wants one."""
    return check_template(template) in ("llama2", "checkpoint")


def encode_chat(tokenizer, messages, template, add_generation_prompt=True):
    """Prompt ids for messages: render, then encode with the BOS handling described at the top."""
    text = render(messages, template, add_generation_prompt, tokenizer=tokenizer)
    return tokenizer.encode(text, add_bos=not template_adds_bos(template))


# -- the checkpoint's own template ------------------------------------------------------------------------
def _config_path(tokenizer):
    path = getattr(tokenizer, "path", None)
    return os.path.join(path, "tokenizer_config.json") if path else "tokenizer_config.json"


def checkpoint_template(tokenizer):
    """tokenizer_config.json's Jinja chat_template, or None. A list of {"name", "template"} entries gives
    the one named "default", as transformers picks it (a list without one: None)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, list):
        jinja = next((e["template"] for e in jinja if isinstance(e, dict) and e.get("name") == "default"), None)
    return jinja if isinstance(jinja, str) and jinja else None


@lru_cache(maxsize=8)
def _special_tokens(path):
    """tokenizer_config.json's bos_token / eos_token / unk_token / pad_token texts (None where unset)."""
    if not path:
        return {}
    from .config import read_json
    config = read_json(os.path.join(path, "tokenizer_config.json"), TokenizerConfigError, optional=True) or {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)                 # a string or {"content": ...}, as tokenizer.py reads it
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def _template_variables(tokenizer):
    """The special-token strings transformers passes to a chat template (its special_tokens_map)."""
    tokens = dict(_special_tokens(getattr(tokenizer, "path", None) or ""))
    if not tokens.get("bos_token"):
        tokens["bos_token"] = tokenizer.id_to_piece(tokenizer.bos_id)
    if not tokens.get("eos_token"):
        tokens["eos_token"] = tokenizer.id_to_piece(tokenizer.eos_id)
    return tokens


@lru_cache(maxsize=16)
def compile_jinja(source, where="tokenizer_config.json"):
    """A chat template compiled the way transformers compiles it (utils/chat_template_utils.py): Jinja's
    sandbox (the template is code from the checkpoint's author), trim_blocks and lstrip_blocks, loop
    controls, and its globals raise_exception / strftime_now and tojson filter (no HTML escaping)."""
    import jinja2
    import jinja2.ext
    from datetime import datetime
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}: chat_template is not valid Jinja: {e.message} (template line "
                                f"{e.lineno}); fix it there, or choose a built-in template (chatml, llama2, "
                                f"none)") from None


def render_jinja(tokenizer, messages, add_generation_prompt=True):
    """The checkpoint's chat_template rendered with transformers' variables: messages, add_generation_prompt,
    the special-token strings (bos_token, eos_token, ...), and tools = documents = None."""
    import jinja2
    where = _config_path(tokenizer)
    source = checkpoint_template(tokenizer)
    if source is None:
        raise ChatTemplateError(f"{where}: no chat_template (or a list of them without one named 'default'); "
                                f"choose a built-in template (chatml, llama2, none)")
    compiled = compile_jinja(source, where)
    try:
        return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **_template_variables(tokenizer))
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{where}: chat_template refused this conversation: {e}") from None
    except Exception as e:                  # the template's own code failed (e.g. str + None)
        raise ChatTemplateError(f"{where}: chat_template failed on this conversation: "
                                f"{type(e).__name__}: {e}") from None


def default_template(tokenizer):
    """The template the tokenizer files suggest.

    "checkpoint" when tokenizer_config.json has a chat_template, except where the model cannot read the
    tokens it writes: Meditron's GPTQ files hold a ChatML template whose <|im_start|>/<|im_end|> ids
    (32017/32018) lie past its 32017-row embedding, so there ChatML cannot be the default ("none"; asking
    for it explicitly gives the tokenizer's clear error). Without a Jinja template: "chatml" when
    <|im_start|> and <|im_end|> are added tokens the model can read, else "none".
    """
    ids = [tokenizer.token_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    limit = tokenizer.vocab_size
    chatml_readable = all(i is not None for i in ids) and (limit is None or max(ids) < limit)
    jinja = checkpoint_template(tokenizer)
    if jinja is not None:
        unreadable = any(i is not None for i in ids) and not chatml_readable
        return "none" if "<|im_start|>" in jinja and unreadable else "checkpoint"
    return "chatml" if chatml_readable else "none"


def stop_strings(template, tokenizer=None):
    """Strings that end the assistant's turn in this template's format (ChatML: "<|im_end|>"; a checkpoint
    template that writes "<|im_end|>", as Qwen's do, the same)."""
    if check_template(template) == "checkpoint":
        return ["<|im_end|>"] if tokenizer is not None and "<|im_end|>" in (checkpoint_template(tokenizer) or "") \
            else []
    return ["<|im_end|>"] if template == "chatml" else []


def stop_conditions(template, tokenizer):
    """(stop_strings, stop_ids) for a template: generation ends on any of these ids or strings.

    Every template stops on the tokenizer's EOS ids. ChatML also stops at the end of the assistant's turn:
    the id of <|im_end|> when the tokenizer has it, and the string "<|im_end|>" for a model that spells it
    out piece by piece.
    """
    strings = stop_strings(template, tokenizer)
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
