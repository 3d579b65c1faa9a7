"""Text in, text out: a Model (the forward pass, model.py) together with its checkpoint's tokenizer.

    model = tinyllama_ref.load("ckpt")            # a TextModel
    model.generate_text("The patient presented with", max_new_tokens=32).text
    model.logits([1, 306, 4658])                  # the Model's own methods are reachable unchanged

The tokenizer is read on first use, so a checkpoint without tokenizer files still runs on token ids.
"""

from .errors import GenerationError
from .eval.items import parse_item
from .eval.loglik import perplexity
from .eval.runner import score
from .generate import generate_text
from .sampling import SamplingParams
from .templates import encode_chat, stop_conditions
from .tokenizer import Tokenizer


class TextModel:
    """A Model with its tokenizer. Attributes not defined here (cfg, layers, logits, forward, new_cache,
    generate, ...) are the wrapped Model's."""

    def __init__(self, model):
        self.model = model
        self._tokenizer = None

    def __getattr__(self, name):
        # Only called for names this class does not define: everything else is the forward pass's.
        model = self.__dict__.get("model")
        if model is None:                     # half-built (unpickling, copying): nothing to delegate to yet
            raise AttributeError(name)
        return getattr(model, name)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (tokenizer.model and its JSON files), read on first use."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.model.path, vocab_size=self.model.cfg.vocab_size)
        return self._tokenizer

    def encode_prompt(self, prompt, template="none", system=None):
        """Text -> token ids, through a chat template unless template is "none"; ids are checked."""
        tok = self.tokenizer
        if template == "none":
            ids = tok.encode(prompt, add_bos=True)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            ids = encode_chat(tok, messages, template)
        tok.check_ids(ids)
        return ids

    def generate_text(self, prompt, max_new_tokens=256, template="none", system=None, stop=(), on_text=None,
                      **sampling):
        """Complete a text prompt (or a list of them); returns the Completion(s) with .text and timings.

        Sampling settings not given come from the checkpoint's generation_config.json.
        """
        batch = not isinstance(prompt, str)
        prompts = list(prompt) if batch and isinstance(prompt, (list, tuple)) else [prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise GenerationError("prompt must be a string or a non-empty list of strings (token ids go to "
                                  "generate())")
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise GenerationError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        if on_text is not None and not callable(on_text):
            raise GenerationError(f"on_text must be a function (index, text) or None, got {on_text!r}")
        ids = [self.encode_prompt(p, template, system) for p in prompts]
        params = SamplingParams.from_generation_config(self.model.path, **sampling)
        stop_strings, stop_ids = stop_conditions(template, self.tokenizer)
        outs = generate_text(self.model, self.tokenizer, ids, max_new_tokens, params, list(stop) + stop_strings,
                             stop_ids=stop_ids, on_text=on_text)
        return outs if batch else outs[0]

    def perplexity(self, text_or_ids, context=None, stride=None):
        """Sliding-window perplexity of a text (or token ids): dict with perplexity and tokens/s."""
        ids = self.tokenizer.encode(text_or_ids, add_bos=True) if isinstance(text_or_ids, str) else text_or_ids
        return perplexity(self.model, ids, context, stride)

    def score(self, items):
        """Multiple-choice items (dicts with question, options, answer): per-item choice and accuracy."""
        if not isinstance(items, (list, tuple)):
            raise GenerationError(f"items must be a list of dicts with question, options and answer, got "
                                  f"{type(items).__name__}")
        parsed = [parse_item(it, f"item {i + 1}") for i, it in enumerate(items)]
        return score(self.model, self.tokenizer, parsed)
