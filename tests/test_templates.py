"""Chat templates: against the Meditron card's ChatML text and the Llama-2-chat Jinja template."""

import json

import pytest

from tinyllama_ref.errors import GenerationError, TokenizerError
from tinyllama_ref.templates import (TEMPLATES, StopStrings, default_template, encode_chat, render,
                                     stop_conditions, stop_strings, template_adds_bos)
from tinyllama_ref.tokenizer import Tokenizer
from tinyllama_ref.make.tokenizer_files import write_tokenizer_files

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template", transcribed.
LLAMA2_CHAT_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about AI"}],
    [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": "Fever 39 °C?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": " q1 "},
     {"role": "assistant", "content": "a1\n"}, {"role": "user", "content": "q2 🙂"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
]


def jinja_render(template, messages, **extra):
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(message):
        raise ValueError(message)
    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **extra)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tpl_chatml")
    write_tokenizer_files(str(out), 600, {"<|im_start|>": 600, "<|im_end|>": 601}, seed=2)
    return out


def test_chatml_is_the_model_card_prompt():
    system_message, prompt = "You are a helpful medical assistant.", "Tell me about AI"
    # The Meditron GPTQ card's prompt_template f-string, with its line breaks.
    card = f'''<|im_start|>system
{system_message}<|im_end|>
<|im_start|>user
{prompt}<|im_end|>
<|im_start|>assistant
'''
    messages = [{"role": "system", "content": system_message}, {"role": "user", "content": prompt}]
    assert render(messages, "chatml") == card
    assert render(messages, "chatml", add_generation_prompt=False) == card[:-len("<|im_start|>assistant\n")]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_matches_its_jinja_template(messages):
    from tinyllama_ref.make.tokenizer_files import CHATML_JINJA
    for gen in (True, False):
        assert render(messages, "chatml", gen) == jinja_render(CHATML_JINJA, messages, add_generation_prompt=gen)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama2_matches_the_llama2_chat_jinja_template(messages):
    expected = jinja_render(LLAMA2_CHAT_JINJA, messages, bos_token="<s>", eos_token="</s>")
    assert render(messages, "llama2") == expected


def test_llama2_hand_case():
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    assert render(messages, "llama2") == \
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]"


def test_llama2_roles_must_alternate():
    with pytest.raises(GenerationError, match="alternate"):
        render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "llama2")
    with pytest.raises(ValueError, match="alternate"):      # the Jinja template refuses the same thing
        jinja_render(LLAMA2_CHAT_JINJA, [{"role": "assistant", "content": "a"}], bos_token="<s>",
                     eos_token="</s>")
    with pytest.raises(GenerationError, match="alternate"):
        render([{"role": "assistant", "content": "a"}], "llama2")


def test_none_joins_contents():
    assert render([{"role": "user", "content": "Once upon"}], "none") == "Once upon"
    assert render(CONVERSATIONS[1], "none") == "You are a careful doctor.\n\nFever 39 °C?"


def test_bad_input_is_refused():
    with pytest.raises(GenerationError,
                       match="unknown chat template 'alpaca'; choose one of checkpoint, chatml, llama2, none"):
        render(CONVERSATIONS[0], "alpaca")
    with pytest.raises(GenerationError, match="empty"):
        render([], "chatml")
    with pytest.raises(GenerationError, match="role 'bot'"):
        render([{"role": "bot", "content": "x"}], "chatml")
    with pytest.raises(GenerationError, match="'role' and 'content'"):
        render(["just a string"], "none")
    assert TEMPLATES == ("checkpoint", "chatml", "llama2", "none")


def test_encode_chat_bos_handling(chatml_dir):
    tok = Tokenizer.from_dir(str(chatml_dir))
    messages = CONVERSATIONS[2]
    llama2 = encode_chat(tok, messages, "llama2")
    # "<s>" in the text is the BOS id, once per user turn, and no extra BOS in front.
    assert llama2[0] == 1 and llama2[1] != 1 and llama2.count(1) == 2 and llama2.count(2) == 1
    assert template_adds_bos("llama2") and not template_adds_bos("chatml")
    assert tok.encode(render(messages, "llama2"), add_bos=True) == llama2      # no doubled BOS either way
    chatml = encode_chat(tok, messages, "chatml")
    assert chatml[:2] == [1, 600] and chatml[-1] == tok.encode("\n", add_bos=False)[-1]
    assert chatml.count(600) == 5 and chatml.count(601) == 4     # 4 turns + the generation prompt
    assert encode_chat(tok, [{"role": "user", "content": "hi"}], "none") == tok.encode("hi")


def test_default_template_from_tokenizer_files(tmp_path, chatml_dir):
    # A Jinja chat_template in tokenizer_config.json is the default (tests/test_chat_templates.py renders it).
    assert default_template(Tokenizer.from_dir(str(chatml_dir))) == "checkpoint"
    assert default_template(Tokenizer.from_dir(str(chatml_dir), vocab_size=602)) == "checkpoint"
    # Meditron's case: the ChatML ids lie past the embedding, so ChatML cannot be the default ...
    meditron = Tokenizer.from_dir(str(chatml_dir), vocab_size=600)
    assert default_template(meditron) == "none"
    # ... and asking for it anyway is the tokenizer's clear error, not a crash.
    with pytest.raises(TokenizerError, match=r"token id 600 \('<\|im_start\|>'\) is past the model's 600-row"):
        meditron.check_ids(encode_chat(meditron, CONVERSATIONS[0], "chatml"))
    write_tokenizer_files(str(tmp_path / "llama2"), 400, chat_template=LLAMA2_CHAT_JINJA)
    assert default_template(Tokenizer.from_dir(str(tmp_path / "llama2"))) == "checkpoint"
    from tinyllama_ref.make.tokenizer_files import CHATML_JINJA
    write_tokenizer_files(str(tmp_path / "spelled"), 400, chat_template=CHATML_JINJA)   # no added tokens
    assert default_template(Tokenizer.from_dir(str(tmp_path / "spelled"))) == "checkpoint"
    # Without a Jinja template: the built-ins, ChatML when its added tokens are there.
    write_tokenizer_files(str(tmp_path / "bare"), 400, {"<|im_start|>": 400, "<|im_end|>": 401}, chat_template="")
    assert default_template(Tokenizer.from_dir(str(tmp_path / "bare"))) == "chatml"
    write_tokenizer_files(str(tmp_path / "plain"), 400)
    assert default_template(Tokenizer.from_dir(str(tmp_path / "plain"))) == "none"


def test_stop_conditions(chatml_dir, tmp_path):
    tok = Tokenizer.from_dir(str(chatml_dir))
    assert stop_conditions("chatml", tok) == (["<|im_end|>"], {2, 601})
    assert stop_conditions("checkpoint", tok) == (["<|im_end|>"], {2, 601})    # its Jinja template is ChatML
    assert stop_conditions("llama2", tok) == ([], {2})
    assert stop_strings("chatml") == ["<|im_end|>"] and stop_strings("none") == stop_strings("llama2") == []
    write_tokenizer_files(str(tmp_path), 400)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    plain = Tokenizer.from_dir(str(tmp_path))
    assert stop_conditions("chatml", plain) == (["<|im_end|>"], {2, 7})   # no <|im_end|> token: string only
    assert stop_conditions("none", plain) == ([], {2, 7})
    assert stop_conditions("checkpoint", plain) == ([], {2, 7})                # no template, no <|im_end|>


def test_stop_strings_hold_back_partial_matches():
    stop = StopStrings(["<|im_end|>", "###"])
    assert stop.push("Hello <|im") == ("Hello ", False)       # "<|im" might start a stop string
    assert stop.push("portant") == ("<|important", False)     # it did not
    assert stop.push(" end #") == (" end ", False)
    assert stop.push("#") == ("", False)
    assert stop.push("# after") == ("", True)                 # "###": nothing of it or after it shown
    assert stop.push("more") == ("", True)
    stop = StopStrings(["<|im_end|>"])
    assert stop.push("abc<|im_e") == ("abc", False)
    assert stop.flush() == "<|im_e"                            # generation ended for another reason
    stop = StopStrings(["<|im_end|>"])
    assert stop.push("x<|im_end|>y") == ("x", True)
    assert StopStrings([]).push("anything <|") == ("anything <|", False)
