"""Small files written whole or not at all: a hidden partial file beside the target, then a rename.

A reader (or a second run) never sees half a config.json; the partial names start with `.partial-`, which the
writers of make/ recognise as their own leftovers.
"""

import json
import os
import shutil

from ..errors import CheckpointError
from ..memory import human

SMALL_FILES_ALLOWANCE = 8 * 1024 * 1024   # tokenizer.model and the JSON files (about 0.5 MB in practice)


def partial_path(path):
    directory, base = os.path.split(path)
    return os.path.join(directory, f".partial-{base}")


def write_json(path, data):
    """Write `data` as indented UTF-8 JSON (with a final newline) to path, atomically."""
    partial = partial_path(path)
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(partial, path)


def check_free_space(out_dir, needed, hint):
    """Refuse before writing anything when the filesystem that will hold out_dir has fewer than `needed`
    bytes free; `hint` says what else the user can do."""
    where = os.path.abspath(out_dir)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise CheckpointError(f"{out_dir}: the checkpoint needs {human(needed)}, only {human(free)} free on "
                              f"{where}; free some space, choose another directory, or {hint}")
    return free


def copy_file(source, path):
    """Copy a file to path, atomically."""
    partial = partial_path(path)
    shutil.copyfile(source, partial)
    os.replace(partial, path)
