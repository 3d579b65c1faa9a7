"""Request fields both APIs share: the sampling parameters a request asks for, and the fields refused.

Every field a route accepts either changes what it does or is refused with a 4xx that names it; nothing is
dropped in silence. A field this server does not implement is still accepted at its "off" value (null, false,
an empty list, {"type": "text"}), because clients send those by default. docs/serving.md has the table of
every field, route by route; tests/test_serve_fields_table.py posts each one.
"""

from ..errors import TinyLlamaError
from ..sampling import SamplingParams
from .jobs import ServeError


def field_error(field, message, kind="validation"):
    """A ServeError that names the request field it is about (OpenAI's error.param)."""
    error = ServeError(message, kind)
    error.param = field
    return error


def refuse_unsupported(body, off_values):
    """Refuse the first field of body set to anything but one of its off values: {field: (off values)}."""
    for field, off in off_values.items():
        value = getattr(body, field)
        if value not in off:
            raise field_error(field, f"{field} is not supported by this server; leave it unset (got {value!r})")


def logit_bias_pairs(state, logit_bias):
    """OpenAI's {"token id": bias} -> ((id, bias), ...), every id inside the vocabulary."""
    if not logit_bias:
        return ()
    vocab = state.model.cfg.vocab_size
    pairs = []
    for key, bias in logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise field_error("logit_bias", f"logit_bias keys are token ids, got {key!r}") from None
        if not 0 <= token < vocab:
            raise field_error("logit_bias", f"logit_bias: token id {token} is outside the vocabulary "
                                            f"(0..{vocab - 1})")
        if not -100 <= bias <= 100:
            raise field_error("logit_bias", f"logit_bias: the bias of token {token} must be in [-100, 100], "
                                            f"got {bias}")
        pairs.append((token, float(bias)))
    return tuple(sorted(pairs))


def make_params(**values):
    """SamplingParams, with the engine's range errors as 4xx that name the field."""
    try:
        return SamplingParams(**values)
    except TinyLlamaError as e:
        message = str(e)
        raise field_error(message.split(" ", 1)[0], message) from None
