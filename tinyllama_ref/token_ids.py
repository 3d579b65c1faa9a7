"""Token ids: what a model can read is a flat sequence of integers, each a row of its embedding.

The forward pass (model.Model.check_ids, a GenerationError) and the tokenizer (tokenizer.Tokenizer.check_ids,
a TokenizerError that names the token) both ask check_token_ids, so ids are judged one way wherever they
enter: the command line, the Python API, the server.
"""

import numpy as np


def as_token_ids(ids, error):
    """A flat sequence of integer token ids as a list of Python ints; anything else raises error(message)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise error(f"token ids must be a flat list of integers, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise error(f"token ids must be a flat list of integers, found {i!r}")
        out.append(int(i))
    return out


def check_token_ids(ids, rows, error, name=None):
    """ids as an int64 array [N] when every one is a row of a `rows`-row embedding; otherwise error(message),
    with name(i) describing the bad id (the tokenizer's piece) when given."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer):
        out = ids.astype(np.int64)                                   # the forward pass's own arrays: no loop
    else:
        out = np.asarray(as_token_ids(ids, error), dtype=np.int64)
    bad = out[(out < 0) | (out >= rows)]
    if bad.size:
        i = int(bad[0])
        what = f"token id {i}" + (f" ({name(i)})" if name else "")
        if i < 0:
            raise error(f"{what} is negative; token ids start at 0")
        raise error(f"{what} is past the model's {rows}-row embedding; this checkpoint cannot read it (it is "
                    f"outside the model's vocabulary, ids 0..{rows - 1})")
    return out
