"""An lm-evaluation-harness model backed by tinyllama-ref: `TinyLlamaLM`, registered as "tinyllama-ref".

    import lm_eval
    from tinyllama_ref.eval.harness import TinyLlamaLM
    lm_eval.simple_evaluate(model=TinyLlamaLM("ckpt", max_memory="20GB"), tasks=["pubmedqa"], ...)
    lm_eval --model tinyllama-ref --model_args pretrained=ckpt,max_memory=20GB ...
    tinyllama-ref lm-eval ckpt --max-memory 20GB ...                 (the same, lm-eval's options passed on)

`lm_eval` finds the name through the lm_eval.models entry point in setup.cfg, or on lm-eval releases that read
no entry points through the start-up hook in eval/startup/.

It follows the conventions of the harness's own `hf` backend with add_bos_token=True, so both give the same
numbers on the same checkpoint (tests/test_eval_harness.py runs them side by side):
  - TemplateLM splits (context, continuation): the context's trailing spaces move to the continuation, the
    whole text is tokenized once and the continuation is what follows the context's tokens; an empty
    context becomes the BOS token;
  - sequences start with BOS, as the checkpoint's tokenizer adds it;
  - a request longer than max_length + 1 tokens loses tokens on the left, as hf truncates;
  - is_greedy: every continuation token is the argmax of its row;
  - loglikelihood_rolling uses the harness's own windows (utils.get_rolling_token_windows, then
    make_disjoint_window) with BOS as the prefix token;
  - generate_until decodes greedily (unless do_sample) up to max_gen_toks new tokens, stops at EOS or at
    any `until` string, and cuts the text at the first of them; the context keeps its last
    max_length - max_gen_toks tokens;
  - --apply_chat_template renders the checkpoint's tokenizer_config.json chat_template (templates.py, as
    transformers renders it) with continue_final_message when no generation prompt is asked for, and on a
    template error tries again without the system messages; a text that starts with the BOS token gets
    no second one.
What it does differently is the scheduling: requests that share a context are scored from one prefill
(prefix.py), and many go through each pass over the weights (batching.py), longest first.
"""

import json
import sys

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import GenerationError
from ..templates import ChatTemplateError, check_template, checkpoint_template, default_template, render
from .batching import KV_FACTOR, default_batch_tokens, pack_longest_first
from .prefix import Group
from .results import KeyedLog, make_header
from .runner import run_batches

DEFAULT_MAX_GEN_TOKS = 256           # the hf backend's max_gen_toks


@register_model("tinyllama-ref", "tinyllama_ref")
class TinyLlamaLM(TemplateLM):
    """lm-evaluation-harness LM over a tinyllama-ref checkpoint (dense or GPTQ, streamed under a budget).

    pretrained (or path): the checkpoint directory; or model: an already loaded tinyllama_ref model.
    batch_tokens: token rows per pass (default: from the memory plan). max_length: context in tokens
    (default: the model's). log_path: a JSONL log of every answer, written a batch at a time; with
    resume=True a log left by a killed run is read back and only the missing requests run.
    template: the chat template --apply_chat_template uses: "auto" (the checkpoint's own when it has one,
    else a built-in; templates.default_template), "checkpoint", "chatml", "llama2" or "none".
    quiet=False: notices and a progress bar per request type on stderr.
    """

    def __init__(self, pretrained=None, backend="numba", max_memory=None, gptq_mode="exact", batch_tokens=None,
                 max_length=None, add_bos_token=True, max_gen_toks=DEFAULT_MAX_GEN_TOKS, log_path=None,
                 resume=False, model=None, path=None, quiet=True, template="auto", **ignored):
        super().__init__()
        # batch_size, device, dtype ... come from lm_eval's command line for every model: not ours to use.
        pretrained = pretrained or path
        quiet = _flag(quiet)
        if model is None:
            import tinyllama_ref
            # str(): lm-eval's model_args parser reads a name like "123" as a number.
            model = tinyllama_ref.load(str(pretrained), backend=backend, max_memory=max_memory,
                                       gptq_mode=gptq_mode, quiet=quiet)
        self.tl_model = model
        self.tokenizer = model.tokenizer
        self.add_bos_token = _flag(add_bos_token)
        self.template = default_template(self.tokenizer) if template in (None, "auto") else check_template(template)
        self._max_length = int(max_length) if max_length else model.cfg.max_seq_len
        if not 2 <= self._max_length <= model.cfg.max_seq_len:
            raise GenerationError(f"max_length must be between 2 and the model's context of "
                                  f"{model.cfg.max_seq_len} tokens, got {self._max_length}")
        self._max_gen_toks = int(max_gen_toks)
        self.batch_tokens = int(batch_tokens) if batch_tokens else default_batch_tokens(model)
        self.on_progress = None                 # on_progress(kind, n_done_now, n_to_do): a progress bar
        self.log = None
        if log_path:
            settings = {"backend": model.backend, "gptq_mode": gptq_mode, "max_length": self._max_length,
                        "add_bos_token": self.add_bos_token, "max_gen_toks": self._max_gen_toks}
            self.log = KeyedLog(log_path, make_header("lm-eval", model.path, settings), resume=_flag(resume))
        if not quiet:
            from .batching import describe
            if self.log and self.log.values:
                print(f"resuming: {len(self.log.values)} answers already in {self.log.path}", file=sys.stderr)
            print(describe(model, self.batch_tokens), file=sys.stderr)
            self.on_progress = _ProgressBars()

    # -- what TemplateLM needs ------------------------------------------------------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self):
        return self.tokenizer.bos_id

    @property
    def max_length(self):
        return self._max_length

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def tokenizer_name(self):
        """A name for lm-eval's request-cache files: the checkpoint path with "/" spelled "__", as hf does."""
        return str(self.tl_model.path).replace("/", "__")

    # -- chat templates (lm-eval's --apply_chat_template) -------------------------------------------------
    def chat_template(self, chat_template=False):
        """What lm-eval records (and hashes) as the chat template: the checkpoint's Jinja text, or the name
        of the built-in in use; None when none is asked for."""
        if chat_template is False or chat_template is None:
            return None
        return checkpoint_template(self.tokenizer) if self.template == "checkpoint" else self.template

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The prompt text for lm-eval's [{"role", "content"}, ...], as its hf backend makes it:
        continue_final_message when no generation prompt is wanted, and after a template error (Mistral-
        instruct's and Gemma's refuse a system message) a second try without the system messages."""
        def text(history):
            return render(history, self.template, add_generation_prompt, tokenizer=self.tokenizer,
                          continue_final_message=not add_generation_prompt)
        try:
            return text(chat_history)
        except ChatTemplateError:
            return text([m for m in chat_history if m["role"] != "system"])

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """Token ids; BOS first when add_special_tokens (default: add_bos_token). A text that already
        starts with the BOS token gets no second one (the tokenizer sees to that)."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(string, add_bos=bool(add))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- log-likelihoods -----------------------------------------------------------------------------------
    def _truncated(self, context, continuation):
        """hf's left truncation: keep the last max_length + 1 tokens; the continuation itself stays whole."""
        seq = (list(context) + list(continuation))[-(self.max_length + 1):]
        return seq[:len(seq) - len(continuation)], list(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(loglik, is_greedy)] for [(strings or None, context ids, continuation ids)], in request order."""
        pairs = [self._truncated(ctx, cont) for _, ctx, cont in requests]
        keys = [KeyedLog.key("loglikelihood", ctx, cont) for ctx, cont in pairs]
        known = self.log.values if self.log else {}
        answers = [tuple(known[k]) if k in known else None for k in keys]
        # Group the requests still to do by their context: one prefill serves all its continuations.
        groups, members, by_context = [], [], {}
        for r, (ctx, cont) in enumerate(pairs):
            if answers[r] is not None:
                continue
            g = by_context.setdefault(tuple(ctx), len(groups))
            if g == len(groups):
                groups.append(Group(ctx, []))
                members.append([])
            groups[g].continuations.append(cont)
            members[g].append(r)
        total = sum(len(m) for m in members)
        for batch, scores in run_batches(self.tl_model, groups, pack_longest_first(groups, self.batch_tokens)):
            done = []
            for g, group_scores in zip(batch, scores):
                for r, (loglik, greedy) in zip(members[g], group_scores):
                    answers[r] = (loglik, greedy)
                    done.append((keys[r], [loglik, greedy]))
            if self.log:
                self.log.append(done)
            if self.on_progress:
                self.on_progress("loglikelihood", len(done), total)
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Log-likelihood of whole texts, over the harness's own rolling windows (as the hf backend)."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (loglik, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += loglik
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm=False):
        from ..generate import TextStopper, run
        from ..sampling import Sampler, SamplingParams
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = [None] * len(requests)
        plans = {}                                  # gen kwargs (as JSON) -> [(request index, ids, until)]
        for r, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            key = KeyedLog.key("generate_until", context, gen_kwargs)
            if self.log and key in self.log.values:
                results[r] = self.log.values[key]
                continue
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            plans.setdefault(json.dumps([max_gen, kwargs], sort_keys=True, default=str), []).append(
                (r, ids, until, key))
        n_todo = sum(len(todo) for todo in plans.values())
        for spec, todo in plans.items():
            max_gen, kwargs = json.loads(spec)
            params = SamplingParams(temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
                                    else 0.0, top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0)),
                                    seed=kwargs.get("seed"))
            todo.sort(key=lambda t: -len(t[1]))     # longest first, as hf does
            budget = KV_FACTOR * self.batch_tokens
            start = 0
            while start < len(todo):
                end = start + 1
                while end < len(todo) and (end + 1 - start) * (len(todo[start][1]) + max_gen) <= budget:
                    end += 1
                batch = todo[start:end]
                stopper = TextStopper(self.tokenizer, len(batch), sorted({u for _, _, until, _ in batch
                                                                         for u in until if u}))
                outs = run(self.tl_model, [ids for _, ids, _, _ in batch], max_gen, Sampler(params),
                           set(self.tokenizer.eos_ids), on_step=stopper)
                done = []
                for (r, ids, until, key), c in zip(batch, outs):
                    text = postprocess_generated_text(self.tok_decode(c.token_ids), until, None)
                    results[r] = text
                    done.append((key, text))
                    self.cache_hook.add_partial("generate_until", requests[r].args, text)
                if self.log:
                    self.log.append(done)
                if self.on_progress:
                    self.on_progress("generate_until", len(done), n_todo)
                start = end
        return results

    def get_model_info(self):
        return {"model": "tinyllama-ref", "checkpoint": str(self.tl_model.path), "backend": self.tl_model.backend}


def _flag(value):
    """A bool from Python or from lm-eval's --model_args text ("True", "false", 1 ...)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


class _ProgressBars:
    """on_progress for a person: one bar per request type, closed when its requests are done."""

    def __init__(self):
        self.bars, self.done = {}, {}

    def __call__(self, kind, n, total):
        from ..progress import Progress
        bar = self.bars.setdefault(kind, Progress(kind, total, unit="requests"))
        self.done[kind] = self.done.get(kind, 0) + n
        bar.update(self.done[kind], total)
        if self.done[kind] >= total:
            bar.close()
            del self.bars[kind], self.done[kind]
