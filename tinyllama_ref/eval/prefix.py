"""Shared-prefix scoring: run a context through the model once, then score each continuation from a fork.

A multiple-choice item is one context (the question, perhaps after few-shot demonstrations) and several
continuations (the options). Scored one sequence at a time, a 250-token question with four 10-token options
costs 4 x 260 = 1,040 token rows; here it costs about 250 + 4 x 10 = 290:

    pass 1  every group's context but its last token, one cache slot per group        (ragged batch)
    fork    copy that slot's keys/values into one slot per further continuation       (kvcache.copy_slot)
    pass 2  per continuation: [last context token] + continuation[:-1], all rows' logits (ragged batch)

Pass 2 starts each continuation one token early so that its first row predicts the continuation's first
token: every continuation then gets exactly len(continuation) rows of logits, and pass 1 needs no logits.
A group with a single continuation (a perplexity window, a lone request) skips the fork and runs whole in
pass 2. Many groups go through the same two passes, so one read of the weights serves all of them.

When every context of a batch starts with the same long run of tokens (few-shot prompts with the same
demonstrations), that run goes first, once, in a pass of its own, and is forked into every group's slot:

    pass 0  the common prefix, once                                                   (>= MIN_COMMON tokens)
    fork    into the first slot of every other group
    pass 1  ... each group continues from there
"""

from dataclasses import dataclass

import numpy as np

from .loglik import continuation_loglik

MIN_COMMON = 32       # tokens: a shorter common prefix saves less than the extra pass over the weights costs


@dataclass
class Group:
    """One context and the continuations scored after it (token ids; the context has at least 1 token)."""
    context: list
    continuations: list

    @property
    def shared(self):
        """Worth a prefill and a fork: several continuations after a context longer than one token."""
        return len(self.continuations) > 1 and len(self.context) > 1

    def rows(self):
        """Token rows this group adds to the batch's passes."""
        if self.shared:
            return len(self.context) - 1 + sum(len(c) for c in self.continuations)
        return sum(len(self.context) - 1 + len(c) for c in self.continuations)

    def longest(self):
        """Cache positions of its longest sequence: context + continuation minus the last (unread) token."""
        return len(self.context) - 1 + max(len(c) for c in self.continuations)


def common_prefix(groups):
    """How many leading tokens every group's context shares (each keeps at least its last token)."""
    contexts = [np.asarray(g.context) for g in groups]
    n = min(len(c) for c in contexts) - 1
    if len(groups) < 2 or n <= 0:
        return 0
    same = np.all([c[:n] == contexts[0][:n] for c in contexts[1:]], axis=0)          # [n]
    return n if same.all() else int(np.argmin(same))


def score_groups(model, groups):
    """Log-likelihood and greediness of every continuation of every group, in one batch (two passes, or
    three with a common prefix).

    Returns one list of (loglik, is_greedy) per group, in the order of its continuations.
    """
    slots, first_slot = [], []                    # slots[k] = (group index, continuation index)
    for g, group in enumerate(groups):
        first_slot.append(len(slots))
        slots += [(g, j) for j in range(len(group.continuations))]
    longest = max(group.longest() for group in groups)
    common = common_prefix(groups)
    common = common if common >= MIN_COMMON else 0
    with model.new_cache(len(slots), longest) as cache:
        if common:                                                        # pass 0: shared by all groups
            model.forward([np.asarray(groups[0].context[:common])], cache, [first_slot[0]])
            for g in range(1, len(groups)):
                cache.copy_slot(first_slot[0], first_slot[g])
        prefill = [g for g, group in enumerate(groups) if group.shared and len(group.context) - 1 > common]
        if prefill:                                                       # pass 1: shared contexts
            model.forward([np.asarray(groups[g].context[common:-1]) for g in prefill], cache,
                          [first_slot[g] for g in prefill])
        for g, group in enumerate(groups):                                # fork: one slot per continuation
            if group.shared:
                for j in range(1, len(group.continuations)):
                    cache.copy_slot(first_slot[g], first_slot[g] + j)
        chunks = []
        for g, j in slots:                                               # pass 2: the continuations
            group, cont = groups[g], groups[g].continuations[j]
            head = group.context[-1:] if group.shared else group.context[common:]
            chunks.append(np.asarray(list(head) + list(cont[:-1])))
        logits = model.forward(chunks, cache, list(range(len(slots))), all_logits=True)   # [sum rows, V]
    out = [[None] * len(group.continuations) for group in groups]
    row = 0
    for (g, j), chunk in zip(slots, chunks):
        cont = groups[g].continuations[j]
        end = row + len(chunk)
        out[g][j] = continuation_loglik(logits[end - len(cont):end], cont)   # rows predicting cont
        row = end
    return out
