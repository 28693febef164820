"""Re-run the examples of the README and docs/ against a live server and write their real output.

Examples are ```console blocks: a line ``$ command`` (continued by lines ending in a backslash) is
run with bash from the repository root, and the lines up to the next ``$`` line or the end of the
block are replaced with what it printed (JSON bodies are re-printed compactly, long ones cut with
``...``). Start a server first, e.g.

    ADAPTERSERVE_ADMIN_TOKEN=secret ADAPTERSERVE_STORE=/tmp/docs-store .venv/bin/adapterserve serve
    ADAPTERSERVE_BASE_MODEL=all-minilm-l6-v2 ADAPTERSERVE_PORT=8002 .venv/bin/adapterserve serve
    .venv/bin/python scripts/doc_examples.py README.md docs/*.md

(the second server, on the encoder base and the repository's store, answers the examples on
port 8002; docs/api.md's API-key example needs its own server on port 8001, see there).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```console\n(.*?)```", re.S)
MAX_LINE = 400


def _shorten(line: str) -> str:
    try:
        body = json.loads(line)
    except ValueError:
        return line if len(line) <= MAX_LINE else line[:MAX_LINE] + "..."
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + "..."


def run(command: str, timeout: float) -> list[str]:
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    out = (done.stdout + done.stderr).rstrip("\n")
    return [_shorten(line) for line in out.splitlines()] if out else []


def rerun_block(block: str, timeout: float) -> str:
    lines = block.rstrip("\n").split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("# "):  # a comment: kept
            out.append(lines[i])
            i += 1
            continue
        if not lines[i].startswith("$ "):
            i += 1  # old output: replaced
            continue
        cmd = [lines[i]]
        while cmd[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        out += cmd
        command = "\n".join(cmd)[2:]
        out += run(command, timeout)
        i += 1
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    for path in args.files:
        text = path.read_text()
        new = BLOCK.sub(lambda m: "```console\n" + rerun_block(m.group(1), args.timeout) + "```", text)
        path.write_text(new)
        print(f"{path}: {len(BLOCK.findall(text))} example blocks re-run")


if __name__ == "__main__":
    main()
