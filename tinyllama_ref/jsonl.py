"""JSON Lines input (prompts, multiple-choice items) with errors that name the file and line."""

import os

from .config import parse_json
from .errors import GenerationError


def read_text(path, what="text"):
    """A whole UTF-8 text file (or pipe: `--prompt-file <(...)` works) with one-line errors naming it; a
    directory where the file should be is refused."""
    if os.path.isdir(path):
        raise GenerationError(f"{path}: is a directory, expected a {what} file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise GenerationError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise GenerationError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise GenerationError(f"{path}: cannot read ({e.strerror or e})") from None


def read_jsonl(path, what="records"):
    """[(where, object)] for each non-blank line, where = "path:line" for the caller's own messages."""
    lines = read_text(path, f"JSONL {what}").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rows.append((f"{path}:{n}", parse_json(line, f"{path}:{n}", GenerationError)))
    if not rows:
        raise GenerationError(f"{path}: no {what}")
    return rows
