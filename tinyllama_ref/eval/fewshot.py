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
harness does), never a demonstration with the item's own question.
"""

import random

from ..errors import GenerationError
from ..evaluate import item_prompt

SEPARATOR = "\n\n"


def demonstration(item):
    return f"{item_prompt(item)} {item.options[item.answer].strip()}"


def fewshot_prompts(items, train, k, seed=0):
    """The prompt of every item: k demonstrations drawn from train, then the item's own question."""
    if k <= 0:
        return [item_prompt(it) for it in items]
    prompts = []
    for n, item in enumerate(items):
        pool = [t for t in train if t.question.strip() != item.question.strip()]
        if len(pool) < k:
            raise GenerationError(f"--num-fewshot {k} needs at least {k} training items besides the question; "
                                  f"the few-shot file has {len(pool)}")
        rng = random.Random(f"{seed}:{n}")
        demos = rng.sample(pool, k)
        prompts.append(SEPARATOR.join([demonstration(d) for d in demos] + [item_prompt(item)]))
    return prompts
