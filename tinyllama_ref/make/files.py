"""Small files written whole or not at all: a hidden partial file beside the target, then a rename.

A reader (or a second run) never sees half a config.json; the partial names start with `.partial-`, which the
writers of make/ recognise as their own leftovers.
"""

import json
import os
import shutil


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


def copy_file(source, path):
    """Copy a file to path, atomically."""
    partial = partial_path(path)
    shutil.copyfile(source, partial)
    os.replace(partial, path)
