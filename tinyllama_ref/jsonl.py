"""JSON Lines input (prompts, multiple-choice items) with errors that name the file and line."""

import json

from .errors import GenerationError


def read_jsonl(path, what="records"):
    """[(where, object)] for each non-blank line, where = "path:line" for the caller's own messages."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise GenerationError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise GenerationError(f"{path}: not UTF-8 text") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise GenerationError(f"{path}: no {what}")
    return rows
