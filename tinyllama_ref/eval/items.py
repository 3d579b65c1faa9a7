"""Multiple-choice items: the JSON schema `score` reads, and the token requests an item becomes.

An item is {"question", "options", "answer", optional "context"}; options may be MedQA's {"A": ..., "B": ...}
and answer an index, an option's text or its letter. Every option continues the same prompt
(item_prompt, the lm-evaluation-harness "Question: ... Answer:" format), split into tokens the way the harness
splits a (context, continuation) pair.
"""

from dataclasses import dataclass

from ..errors import GenerationError
from ..jsonl import read_jsonl


@dataclass
class Item:
    question: str
    options: list
    answer: int          # index of the right option
    context: str = ""    # PubMedQA-style passage shown before the question


def parse_item(obj, where):
    """One multiple-choice item from JSON; `where` names it in errors (file:line)."""
    if not isinstance(obj, dict):
        raise GenerationError(f"{where}: expected a JSON object with question, options, answer")
    for key in ("question", "options", "answer"):
        if key not in obj:
            raise GenerationError(f"{where}: missing field {key!r}")
    q, options, answer = obj["question"], obj["options"], obj["answer"]
    if isinstance(options, dict):                      # MedQA ships {"A": "...", "B": "..."}
        letters = list(options)
        options = [options[k] for k in letters]
        if isinstance(answer, str) and answer in letters:
            answer = letters.index(answer)
    if not isinstance(q, str) or not isinstance(options, list) or len(options) < 2 or \
            not all(isinstance(o, str) and o for o in options):
        raise GenerationError(f"{where}: question must be text and options a list of at least 2 non-empty texts")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise GenerationError(f"{where}: answer must be an option index or an option's text")
    if isinstance(answer, str):
        if answer in options:
            answer = options.index(answer)
        elif len(answer) == 1 and answer.isalpha() and ord(answer.upper()) - 65 < len(options):
            answer = ord(answer.upper()) - 65          # "C" -> 2
        else:
            raise GenerationError(f"{where}: answer {answer!r} is neither an option's text nor its letter")
    if not 0 <= answer < len(options):
        raise GenerationError(f"{where}: answer index {answer} is out of range for {len(options)} options")
    return Item(q, options, answer, str(obj.get("context", "") or ""))


def read_items(path):
    """A JSONL file of items; a malformed line is an error that names the line."""
    return [parse_item(obj, where) for where, obj in read_jsonl(path, "items")]


def item_prompt(item):
    """The text every option continues (the lm-evaluation-harness 'Question: ... Answer:' format)."""
    head = f"{item.context.strip()}\n" if item.context else ""
    return f"{head}Question: {item.question.strip()}\nAnswer:"


def split_continuation(tokenizer, context, continuation):
    """Token ids of a context and of the continuation after it, the way lm-evaluation-harness splits them.

    Spaces at the end of the context move to the continuation (word-boundary spaces belong to what is
    scored); the whole text is tokenized once and the continuation is what follows the context's own
    tokens, so a word that straddles the seam is tokenized as the model would see it in one piece.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:                                   # nothing to condition on but BOS
        return [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False)
    ctx = tokenizer.encode(context, add_bos=True)
    cont = tokenizer.encode(context + continuation, add_bos=True)[len(ctx):]
    if not cont:
        raise GenerationError(f"the continuation {continuation!r} adds no tokens after its context")
    return ctx, cont


def item_requests(tokenizer, item, prompt=None):
    """(context ids, [continuation ids per option]) of an item; prompt defaults to item_prompt(item)."""
    prompt = item_prompt(item) if prompt is None else prompt
    pairs = [split_continuation(tokenizer, prompt, " " + o) for o in item.options]
    return pairs[0][0], [cont for _, cont in pairs]
