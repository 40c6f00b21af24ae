"""Every ```python block of README.md runs as written, on a CPU.

The blocks run one after another in one child process, each in a fresh namespace (a block defines
every name it uses), with the environment a reader has: no GPU (``CUDA_VISIBLE_DEVICES=""``), no
``TRITON_INTERPRET`` or ``FASTRNN_BACKEND`` from the test run, matplotlib drawing off screen, and
a scratch working directory so a block that writes a file leaves the checkout alone. Whatever
blocks the README holds are run; a failure names the block by its README line, with the traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

#: A fenced block opened by ```python (at the start of a line) and closed by ``` on a line of its own.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

#: Runs the blocks given as JSON on stdin ([[line, code], ...]); prints one JSON result per block.
RUNNER = r"""
import json, sys, time, traceback
blocks = json.load(sys.stdin)
for line, code in blocks:
    started = time.perf_counter()
    try:
        # padded so that a traceback's line numbers are README.md's
        exec(compile("\n" * (line - 1) + code, "README.md", "exec"), {"__name__": "__main__"})
        error = None
    except BaseException:
        error = traceback.format_exc()
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    print(json.dumps({"line": line, "seconds": round(time.perf_counter() - started, 2), "error": error}), flush=True)
"""


def readme_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` for every ```python block of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_block_extraction():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n  ```python\nnot a block start\n```\n```python\nb = 2\nc = 3\n```\n"
    assert readme_blocks(text) == [(3, "a = 1\n"), (12, "b = 2\nc = 3\n")]


def test_readme_python_blocks_run(tmp_path):
    blocks = readme_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_BACKEND")}
    env.update(CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(blocks), f"the runner stopped early (exit {done.returncode}):\n{done.stderr[-3000:]}"
    failures = [f"README.md block at line {r['line']} ({r['seconds']} s):\n{r['error']}" for r in results if r["error"]]
    assert not failures, "\n".join(failures)
