"""Choosing the next token from the logits: greedy, temperature, top-k, top-p, min-p, repetition penalty,
and OpenAI's presence/frequency penalties and logit bias.

The steps and their order are those of Hugging Face generate(). transformers'
generation/utils.py `_get_logits_processor` appends RepetitionPenaltyLogitsProcessor first (it applies to
greedy decoding too), then, only when sampling, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
and MinPLogitsWarper, in that order; generation/logits_process.py holds each one. Every step below is a
small function over a [V] array of logits that returns a new [V] array; a removed token gets -inf, so
softmax gives it probability 0.

OpenAI's three additions come right after the repetition penalty and, like it, apply to greedy decoding
too. They add to logits rather than scale them (platform.openai.com/docs/advanced-usage, "frequency and
presence penalties"): logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty, where
count[t] is how often t was *generated* so far (the prompt does not count), and logit[t] += logit_bias[t].
Only a Sampler knows which ids it generated, so a Sampler serves one sequence when these are set.

Temperature 0 means greedy: the argmax of the (penalised) logits, no randomness.
"""

import math
import os
from dataclasses import dataclass, fields, replace

import numpy as np

from .config import config_bool, config_float, config_ids, config_int, read_json
from .errors import GenerationConfigError, GenerationError


GENERATION_FIELDS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                     "repetition_penalty": float, "do_sample": bool}


def read_generation_config(checkpoint_dir):
    """generation_config.json's sampling fields and token ids, type- and range-checked ({} without the file).

    Returns only the fields present and not null: the sampling values of GENERATION_FIELDS, and bos_token_id /
    eos_token_id as tuples of ids. A wrong type or a nonsense value is a GenerationConfigError (a ConfigError
    and a GenerationError) naming the file and the key.
    """
    path = os.path.join(checkpoint_dir, "generation_config.json")
    raw = read_json(path, GenerationConfigError, optional=True) or {}
    out = {}
    for key, kind in GENERATION_FIELDS.items():
        value = raw.get(key)
        if value is None:
            continue
        if kind is bool:
            out[key] = config_bool(raw, key, path, None, error=GenerationConfigError)
        elif kind is int:
            out[key] = config_int(raw, key, path, minimum=0, error=GenerationConfigError)
        else:
            out[key] = config_float(raw, key, path, None, positive=False, error=GenerationConfigError)
    sampling = {k: v for k, v in out.items() if k != "do_sample"}
    try:
        SamplingParams(**sampling)                  # the ranges, by the same rules as any caller's values
    except GenerationError as e:
        raise GenerationConfigError(f"{path}: {e}") from None
    for key in ("bos_token_id", "eos_token_id"):
        ids = config_ids(raw, key, path, error=GenerationConfigError)
        if ids:
            out[key] = ids
    return out


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0         # 0 = greedy; < 1 sharpens, > 1 flattens
    top_k: int = 0                   # keep the k most likely tokens; 0 = off
    top_p: float = 1.0               # keep the smallest set whose probability reaches top_p; 1 = off
    min_p: float = 0.0               # drop tokens less likely than min_p * (top token's probability); 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output; 1 = off
    seed: int = None                 # None: a fresh random seed each run
    presence_penalty: float = 0.0    # OpenAI: subtracted once from every token generated so far; 0 = off
    frequency_penalty: float = 0.0   # OpenAI: subtracted once per time a token was generated; 0 = off
    logit_bias: tuple = ()           # OpenAI: ((token id, bias in [-100, 100]), ...) added to the logits

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Refuse values that make no sense, one sentence each."""
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise GenerationError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise GenerationError(f"{name} must be a finite number, got {value}")
            return value

        if number("temperature") < 0:
            raise GenerationError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise GenerationError(f"top_k must be a whole number >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < number("top_p") <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            raise GenerationError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        if number("repetition_penalty") <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 turns it off), got "
                                  f"{self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise GenerationError(f"seed must be a whole number >= 0, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise GenerationError(f"{name} must be in [-2, 2] (0 turns it off), got {getattr(self, name)}")
        for pair in self.logit_bias:
            if (not isinstance(pair, tuple) or len(pair) != 2 or isinstance(pair[0], bool)
                    or not isinstance(pair[0], (int, np.integer)) or pair[0] < 0
                    or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float))
                    or not -100 <= pair[1] <= 100):
                raise GenerationError(f"logit_bias must be (token id >= 0, bias in [-100, 100]) pairs, got "
                                      f"{pair!r}")
        return self

    @property
    def counts_generated(self):
        """True when the distribution depends on which tokens this sequence generated."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_options(cls, **options):
        """SamplingParams from a caller's keyword arguments: an unknown name is a GenerationError, not a
        TypeError (None values are left out, so defaults apply)."""
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise GenerationError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    @property
    def greedy(self):
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, checkpoint_dir, **overrides):
        """Defaults as transformers' generate() would take them from generation_config.json, then overrides.

        As in transformers, sampling happens only when the file says "do_sample": true; otherwise decoding
        is greedy (temperature 0). An explicit temperature override > 0 turns sampling on. Fields the file
        leaves out take transformers' defaults (GenerationConfig._get_default_generation_params): note
        top_k 50, not 0. Overrides that are None are ignored, so a CLI can pass every option through.
        """
        file = read_generation_config(checkpoint_dir)
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise GenerationError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
        values.update({k: file[k] for k in values if k in file})
        if not file.get("do_sample", False):
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_seed(self, seed):
        return replace(self, seed=seed)


# ---- the steps, each [V] -> [V] ----

def softmax(logits):
    """Probabilities from logits [V]; -inf entries get exactly 0."""
    shifted = np.exp(logits - np.max(logits))        # [V], the largest is exp(0) = 1
    return shifted / shifted.sum()


def apply_repetition_penalty(logits, previous_ids, penalty):
    """transformers RepetitionPenaltyLogitsProcessor: each distinct token already seen has its logit divided
    by the penalty if positive, multiplied if negative, so it always becomes less likely (for penalty > 1)."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < logits.shape[0])]  # ids the model cannot emit are left alone
    out = logits.copy()
    score = out[seen]                                 # [n_seen]
    out[seen] = np.where(score < 0, score * penalty, score / penalty)
    return out


def apply_presence_frequency(logits, generated_ids, presence, frequency):
    """OpenAI's penalties: logit[t] -= count[t] * frequency + (count[t] > 0) * presence, count over the
    generated ids only."""
    if (presence == 0 and frequency == 0) or len(generated_ids) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated_ids, dtype=np.int64), return_counts=True)   # [n_distinct]
    keep = (ids >= 0) & (ids < logits.shape[0])
    out = logits.copy()
    out[ids[keep]] -= counts[keep] * frequency + presence
    return out


def apply_logit_bias(logits, logit_bias):
    """OpenAI's logit_bias: add each bias to its token's logit (-100 all but bans a token, 100 all but forces
    it). Ids the model cannot emit are left alone (a server refuses them before they get here)."""
    if not logit_bias:
        return logits
    out = logits.copy()
    for token, bias in logit_bias:
        if token < out.shape[0]:
            out[token] += bias
    return out


def apply_temperature(logits, temperature):
    """transformers TemperatureLogitsWarper: logits / temperature."""
    return logits / temperature


def top_k_filter(logits, k):
    """transformers TopKLogitsWarper: remove tokens below the k-th largest logit (ties with it stay)."""
    if k <= 0 or k >= logits.shape[0]:
        return logits
    kth_largest = np.partition(logits, -k)[-k]
    return np.where(logits < kth_largest, -np.inf, logits)


def top_p_filter(logits, top_p):
    """transformers TopPLogitsWarper: sort ascending, remove the tokens whose cumulative probability stays
    <= 1 - top_p; what is left is the smallest set of most likely tokens holding at least top_p. The most
    likely token always stays."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")        # [V] ids, least likely first
    cumulative = np.cumsum(softmax(logits[order]))    # [V]
    remove_sorted = cumulative <= 1 - top_p           # [V] in sorted order
    remove_sorted[-1] = False                         # min_tokens_to_keep = 1
    remove = np.empty_like(remove_sorted)
    remove[order] = remove_sorted                     # back to vocabulary order
    return np.where(remove, -np.inf, logits)


def min_p_filter(logits, min_p):
    """transformers MinPLogitsWarper: remove tokens whose probability is below min_p times the top one's."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    remove = probs < min_p * probs.max()              # the top token never satisfies this
    return np.where(remove, -np.inf, logits)


def process_logits(logits, previous_ids, params, generated_ids=()):
    """All the steps in transformers' order, OpenAI's after the repetition penalty. Returns float64 [V];
    greedy stops after the penalties and the bias. previous_ids: prompt + generated; generated_ids: the
    generated part alone (for OpenAI's penalties)."""
    logits = np.asarray(logits, dtype=np.float64)     # [V]; float64 keeps top-p's cumulative sums exact
    if logits.ndim != 1:
        raise GenerationError(f"expected logits of shape [vocab], got shape {logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any() or np.isneginf(logits).all():
        raise GenerationError("the model produced NaN or infinite logits; the weights or the input are broken")
    logits = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    logits = apply_presence_frequency(logits, generated_ids, params.presence_penalty, params.frequency_penalty)
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return logits


def draw(probs, rng):
    """One token id from probs [V]: inverse CDF with one uniform number, never a zero-probability token."""
    cumulative = np.cumsum(probs)                     # [V]
    u = rng.random() * cumulative[-1]
    i = int(np.searchsorted(cumulative, u, side="right"))   # first id whose cumulative mass exceeds u
    return min(i, int(np.flatnonzero(probs)[-1]))     # guard against u rounding up to the total


class Sampler:
    """Holds the parameters, the random generator (seeded from params.seed) and, for one sequence, the ids
    sample() chose (OpenAI's penalties count those) across steps."""

    def __init__(self, params=None):
        self.params = (params or SamplingParams()).validate()
        self.rng = np.random.default_rng(self.params.seed)
        self.generated = []              # what sample() returned, in order

    def probabilities(self, logits, previous_ids=()):
        """The distribution the next token is drawn from: float64 [V] (one-hot when greedy)."""
        processed = process_logits(logits, previous_ids, self.params, self.generated)
        if self.params.greedy:
            probs = np.zeros_like(processed)
            probs[int(np.argmax(processed))] = 1.0
            return probs
        return softmax(processed)

    def sample(self, logits, previous_ids=()):
        """Next token id for one sequence: logits float32 [V], previous_ids = prompt + generated so far."""
        processed = process_logits(logits, previous_ids, self.params, self.generated)
        token = int(np.argmax(processed)) if self.params.greedy else draw(softmax(processed), self.rng)
        self.generated.append(token)
        return token

    def sample_batch(self, logits, histories):
        """Next token ids for B sequences: logits [B, V], histories a list of B id lists. Rows draw from the
        one generator in order, so a batch equals B sample() calls made in row order."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != len(histories):
            raise GenerationError(f"expected logits [B, vocab] with B = {len(histories)} histories, "
                                  f"got shape {logits.shape}")
        if self.params.counts_generated:
            raise GenerationError("presence_penalty and frequency_penalty count one sequence's tokens: use a "
                                  "Sampler per sequence and sample(), not sample_batch()")
        out = [self.sample(row, history) for row, history in zip(logits, histories)]
        self.generated.clear()           # rows are different sequences: nothing to count across them
        return out
