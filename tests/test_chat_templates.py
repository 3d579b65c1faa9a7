"""The checkpoint's own chat template (tokenizer_config.json "chat_template") against transformers'
AutoTokenizer.apply_chat_template: the same text and the same ids, on tokenizer files made here.

The templates are public text, written out from the formats they implement (the models' tokenizer_config.json
files): Llama-2-chat, Qwen2's ChatML with a default system message, Zephyr (written over several lines, so it
needs trim_blocks / lstrip_blocks), Mistral-instruct (bos_token; raises on roles that do not alternate) and
Gemma (bos_token; raises on a system message; the trim filter), plus one that prints messages with tojson.
"""

import json
import shutil

import pytest

from tinyllama_ref.errors import GenerationError, TinyLlamaError, TokenizerConfigError
from tinyllama_ref.make.tokenizer_files import write_tokenizer_files
from tinyllama_ref.templates import ChatTemplateError, default_template, encode_chat, render, stop_conditions
from tinyllama_ref.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

LLAMA2_CHAT = (
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

QWEN2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

TOJSON = "{% for message in messages %}{{ message | tojson }}\n{% endfor %}{{ eos_token }}"

TEMPLATES = {"llama2": LLAMA2_CHAT, "qwen2": QWEN2_CHATML, "zephyr": ZEPHYR, "mistral": MISTRAL_INSTRUCT,
             "gemma": GEMMA, "tojson": TOJSON}

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about AI"}],
    [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": "Fever 39 °C?"}],
    [{"role": "user", "content": " q1 "}, {"role": "assistant", "content": "a1\n"},
     {"role": "user", "content": "q2 🙂 \"quoted\" <b>"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],          # not alternating
]

ADDED = {"<|im_start|>": 400, "<|im_end|>": 401}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tpl_base")
    # "legacy" written out: transformers 5 reads an absent flag as false, tokenizer.py as true (the older
    # transformers default), and the text after "<s>" or "<|im_start|>" tokenizes differently under each.
    write_tokenizer_files(str(out), 400, ADDED, seed=3, chat_template="", legacy=False)
    return out


def with_template(base_dir, root, name, template):
    """A copy of the tokenizer files whose tokenizer_config.json holds `template`."""
    out = root / name
    shutil.copytree(base_dir, out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tokenizers(base_dir, tmp_path_factory):
    """{name: (ours, transformers')} for every template."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("chat_tpl")
    out = {}
    for name, template in TEMPLATES.items():
        d = str(with_template(base_dir, root, name, template))
        out[name] = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    return out


def hf_ids(hf, messages, gen):
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if not isinstance(ids, list):           # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@pytest.mark.parametrize("name", TEMPLATES)
def test_text_and_ids_match_transformers(tokenizers, name):
    import jinja2
    ours, hf = tokenizers[name]
    assert default_template(ours) == "checkpoint"
    n_refused = 0
    for messages in CONVERSATIONS:
        for gen in (True, False):
            try:
                expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            except jinja2.exceptions.TemplateError as e:
                with pytest.raises(ChatTemplateError, match=f"tokenizer_config.json: chat_template refused this "
                                                            f"conversation: {e}"):
                    render(messages, "checkpoint", gen, tokenizer=ours)
                n_refused += 1
                continue
            assert render(messages, "checkpoint", gen, tokenizer=ours) == expected
            assert encode_chat(ours, messages, "checkpoint", gen) == hf_ids(hf, messages, gen)
    # The templates that raise_exception on a conversation did refuse one here.
    assert (n_refused > 0) == (name in ("llama2", "mistral", "gemma"))


@pytest.mark.parametrize("name", ["qwen2", "llama2", "zephyr"])
def test_continue_final_message_matches_transformers(tokenizers, name):
    """lm-eval's hf backend renders a conversation ending in an assistant turn with continue_final_message."""
    ours, hf = tokenizers[name]
    messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "The answer is "}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message=True)
    assert render(messages, "checkpoint", False, tokenizer=ours, continue_final_message=True) == expected


def test_bos_token_from_the_template_only(tokenizers):
    """The template decides BOS: Mistral's writes it once, ChatML none, Llama-2 one per user turn."""
    conversation = CONVERSATIONS[2]
    assert encode_chat(tokenizers["mistral"][0], conversation, "checkpoint").count(1) == 1
    assert 1 not in encode_chat(tokenizers["qwen2"][0], conversation, "checkpoint")
    assert encode_chat(tokenizers["llama2"][0], conversation, "checkpoint").count(1) == 2


def test_qwen_style_template_stops_at_im_end(tokenizers):
    assert stop_conditions("checkpoint", tokenizers["qwen2"][0]) == (["<|im_end|>"], {2, 401})
    assert stop_conditions("checkpoint", tokenizers["zephyr"][0]) == ([], {2})


def test_malformed_or_raising_template_is_our_error(base_dir, tmp_path):
    bad = Tokenizer.from_dir(str(with_template(base_dir, tmp_path, "bad", "{% for m in messages %}{{ m.content }")))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: chat_template is not valid Jinja") as e:
        render(CONVERSATIONS[0], "checkpoint", tokenizer=bad)
    assert isinstance(e.value, TinyLlamaError) and isinstance(e.value, TokenizerConfigError)
    assert str(bad.path) in str(e.value)
    mistral = Tokenizer.from_dir(str(with_template(base_dir, tmp_path, "mistral", MISTRAL_INSTRUCT)))
    with pytest.raises(GenerationError, match="Conversation roles must alternate"):     # system first
        encode_chat(mistral, CONVERSATIONS[1], "checkpoint")
    # The sandbox: a template cannot reach Python internals.
    escape = Tokenizer.from_dir(str(with_template(base_dir, tmp_path, "escape",
                                                  "{{ messages.__class__.__mro__ }}")))
    with pytest.raises(ChatTemplateError, match="chat_template"):
        render(CONVERSATIONS[0], "checkpoint", tokenizer=escape)


def test_without_a_jinja_template_the_builtins_stay(base_dir):
    tok = Tokenizer.from_dir(str(base_dir))
    assert default_template(tok) == "chatml"
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        render(CONVERSATIONS[0], "checkpoint", tokenizer=tok)
    assert render(CONVERSATIONS[1], "chatml") == render(CONVERSATIONS[1], "chatml", tokenizer=tok)
