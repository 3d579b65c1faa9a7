"""Every command README.md shows runs as written, on the checkpoint the README makes, as a new user would.

The convention (README.md's first lines say it too): every ```bash and ```python block is preceded by a marker
comment, and a block without one fails test_every_command_block_is_marked. Other fences (```text, ```yaml)
are not commands.

    <!-- readme: run -->                   run the block
    <!-- readme: run twice -->             run it, then run it again (set-up commands must be safe to repeat)
    <!-- readme: run, needs EXTRA -->      run it if the extra's modules import; otherwise skip, saying which

Blocks run in README order in one temporary directory, so later blocks see the files earlier ones made
(./tiny-gptq, notes.txt, items.jsonl); running one block's test first runs the blocks before it. A bash block
runs as one script (`bash -e`, its own process group, killed when it ends or after TIMEOUT s); a python block
as one script. Two commands are checked but not run: `pip install` (the package under test is installed
already; the test checks that it is the source checkout with an extra setup.cfg defines, since tinyllama-ref
is not published) and `python -m pytest` (the suite this test is part of).
"""

import configparser
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 600
EXTRA_MODULES = {"verify": ["torch", "transformers"], "serve": ["fastapi", "uvicorn"], "eval": ["lm_eval"],
                 "distributed": ["ray"]}
MARKER = re.compile(r"<!-- readme: run( twice)?(?:, needs (\w+))? -->")
COMMAND_LANGS = {"bash", "sh", "shell", "python"}


def blocks(text=None):
    """[(line, lang, code, marker match or None)] of every fenced block of README.md."""
    lines = (text if text is not None else README.read_text(encoding="utf-8")).splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        out.append((start + 1, lang, "\n".join(lines[start + 1:end]), MARKER.fullmatch(before.strip())))
        i = end + 1
    return out


def runnable():
    return [b for b in blocks() if b[1] in COMMAND_LANGS]


def extras_defined():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return set(cfg["options.extras_require"])


def strip_unrun(code):
    """The bash code without its `pip install` and `python -m pytest` commands, after checking them."""
    kept = []
    for line in code.splitlines():
        if "pip install" not in line and "python -m pytest" not in line:
            kept.append(line)                     # verbatim: it may be inside a here-document
            continue
        parts = [p.strip() for p in line.split(" && ")]
        rest = []
        for part in parts:
            if part.startswith("pip install"):
                m = re.fullmatch(r"pip install -e (?:\.|'\.\[(\w+)\]')", part)
                assert m, f"{part!r}: install from the source checkout (pip install -e . or -e '.[extra]')"
                assert m.group(1) is None or m.group(1) in extras_defined(), f"{part!r}: no such extra"
            elif part.startswith("python -m pytest"):
                pass
            else:
                rest.append(part)
        if rest:
            kept.append(" && ".join(rest))
    return "\n".join(kept)


def missing_modules(extra):
    return [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]


def port_busy(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def run_block(workdir, line, lang, code):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if lang == "python":
        script = workdir / f"readme_block_{line}.py"
        script.write_text(code, encoding="utf-8")
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-c", strip_unrun(code)]
    p = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"README.md line {line}: still running after {TIMEOUT} s:\n{out[-3000:]}")
    finally:
        try:                                      # a server the block started and did not stop
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, f"README.md line {line} exited {p.returncode}:\n{code}\n--- output ---\n{out[-3000:]}"
    return out


class Session:
    """The blocks run so far, in one directory (README order: later blocks use what earlier ones made)."""

    def __init__(self, workdir):
        self.workdir, self.done = workdir, {}

    def skip_reason(self, lang, code, marker):
        extra = marker.group(2)
        if extra and missing_modules(extra):
            return f"needs the extra [{extra}] ({', '.join(missing_modules(extra))} not installed)"
        for port in re.findall(r"--port (\d+)", code):
            if port_busy(int(port)):
                return f"port {port} is in use on this machine"
        return None

    def run(self, index):
        for i, (line, lang, code, marker) in enumerate(runnable()[:index + 1]):
            if i in self.done:
                continue
            reason = self.skip_reason(lang, code, marker)
            if reason is None:
                for _ in range(2 if marker.group(1) else 1):
                    run_block(self.workdir, line, lang, code)
            self.done[i] = reason
        return self.done[index]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session(tmp_path_factory.mktemp("readme"))


def test_every_command_block_is_marked():
    unmarked = [line for line, lang, _, marker in blocks() if lang in COMMAND_LANGS and marker is None]
    assert not unmarked, f"README.md: command blocks at lines {unmarked} have no <!-- readme: run --> marker"
    assert not [line for line, lang, _, _ in blocks() if lang == ""], "README.md: give every fence a language"


def test_the_marker_convention_is_read_as_documented():
    text = "a\n<!-- readme: run twice -->\n```bash\necho hi\n```\n<!-- readme: run, needs serve -->\n" \
           "```python\nprint(1)\n```\n```text\nx\n```\n"
    (_, _, _, m1), (_, _, _, m2), (_, _, _, m3) = blocks(text)
    assert m1.group(1) and m1.group(2) is None
    assert not m2.group(1) and m2.group(2) == "serve"
    assert m3 is None
    assert strip_unrun("pip install -e . && tinyllama-ref synth x\npip install -e '.[serve]'\nls") == \
        "tinyllama-ref synth x\nls"
    with pytest.raises(AssertionError):
        strip_unrun("pip install 'tinyllama-ref[serve]'")


def test_the_first_command_is_safe_to_repeat(tmp_path):
    line, lang, code, marker = runnable()[0]
    assert "synth" in code and "--exist-ok" in code and marker.group(1), "the set-up command runs twice"
    # --exist-ok keeps only the checkpoint these settings make; another one in the directory is still an error
    from tinyllama_ref.errors import CheckpointError
    from tinyllama_ref.make.synth import synthesize
    out = str(tmp_path / "ckpt")
    assert not synthesize(out, bits=4, group_size=32, quiet=True, exist_ok=True)["kept"]
    assert synthesize(out, bits=4, group_size=32, quiet=True, exist_ok=True)["kept"]
    with pytest.raises(CheckpointError, match="not empty"):
        synthesize(out, bits=3, group_size=32, quiet=True, exist_ok=True)


@pytest.mark.parametrize("index", range(len(runnable())),
                         ids=[f"line{line}" for line, _, _, _ in runnable()])
def test_readme_block(session, index):
    reason = session.run(index)
    if reason:
        pytest.skip(reason)
