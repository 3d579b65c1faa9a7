"""Few-shot prompts for `score`: K solved examples from a training file in front of each question.

The Meditron paper evaluates MedQA, MedMCQA and PubMedQA with 3 to 5 in-context demonstrations. Each
demonstration is written in the same format as the question it precedes, followed by its right answer:

    [passage]                         (PubMedQA-style items only)
    Question: <demo question>
    Answer: <the demo's right option>
                                      (a blank line between blocks)
    Question: <the item's question>
    Answer:                           <- each option is scored after this, with its leading space

Which demonstrations an item gets is drawn from the training items with random.Random(f"{seed}:{item}"):
the same seed gives the same prompts whatever else runs, and different items get different draws (as the
harness does), never a demonstration with the item's own question. With same=True every item gets the same
k demonstrations (drawn once, with random.Random(f"{seed}"), from training items whose question is none of
the test questions): then all prompts start alike, and prefix.py runs that common start once per batch.
"""

import random

from ..errors import GenerationError
from .items import item_prompt

SEPARATOR = "\n\n"


def demonstration(item):
    return f"{item_prompt(item)} {item.options[item.answer].strip()}"


def fewshot_prompts(items, train, k, seed=0, same=False):
    """The prompt of every item: k demonstrations drawn from train, then the item's own question."""
    if k <= 0:
        return [item_prompt(it) for it in items]
    if same:
        questions = {it.question.strip() for it in items}
        demos = _draw([t for t in train if t.question.strip() not in questions], k, f"{seed}")
        head = SEPARATOR.join(demonstration(d) for d in demos)
        return [head + SEPARATOR + item_prompt(item) for item in items]
    prompts = []
    for n, item in enumerate(items):
        demos = _draw([t for t in train if t.question.strip() != item.question.strip()], k, f"{seed}:{n}")
        prompts.append(SEPARATOR.join([demonstration(d) for d in demos] + [item_prompt(item)]))
    return prompts


def _draw(pool, k, seed):
    if len(pool) < k:
        raise GenerationError(f"--num-fewshot {k} needs at least {k} training items besides the questions "
                              f"scored; the few-shot file has {len(pool)}")
    return random.Random(seed).sample(pool, k)
