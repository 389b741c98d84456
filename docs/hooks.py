"""MkDocs hooks for this site.

- Docstring examples (``>>>`` blocks, as doctest reads them) become code blocks wherever they
  appear, so a docstring section griffe does not know as "Examples" still shows its example
  as code, not as Markdown (where ``x["a"]["b"]`` reads as a link).
- The benchmark plot lives in bench/results/ (where ``fastrms bench --out`` writes it); it is
  copied into the site as images/bench.png instead of a second copy in docs/.
"""
from __future__ import annotations

import re
from pathlib import Path

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

PLOT = Path(__file__).resolve().parent.parent / "bench" / "results" / "bench.png"
_FENCE = re.compile(r"^\s*(```|~~~)")


class DoctestBlocks(Preprocessor):
    """Wrap each doctest block (from a ``>>>`` line to the next blank line) in a code fence."""

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        block: list[str] = []
        in_fence = False
        for line in [*lines, ""]:
            if block:
                if line.strip():
                    block.append(line)
                    continue
                indent = min(len(x) - len(x.lstrip()) for x in block)
                out += ["", "```pycon", *(x[indent:] for x in block), "```", ""]
                block = []
            if _FENCE.match(line):
                in_fence = not in_fence
            if not in_fence and line.lstrip().startswith(">>>"):
                block.append(line)
            else:
                out.append(line)
        return out[:-1] if out and out[-1] == "" and (not lines or lines[-1] != "") else out


class DoctestBlocksExtension(Extension):
    def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
        md.preprocessors.register(DoctestBlocks(md), "fastrms_doctest_blocks", 29)


@event_priority(100)  # before mkdocstrings takes its copy of the extension list
def on_config(config):
    config.markdown_extensions.append(DoctestBlocksExtension())
    return config


def on_files(files, config):
    files.append(File.generated(config, "images/bench.png", abs_src_path=str(PLOT)))
    return files
