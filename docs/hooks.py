"""MkDocs hooks: one page per example (its docstring, then its source) and the benchmark figures,
read from the repository at build time so nothing is copied into ``docs/``."""

import ast
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def _example_page(path: Path) -> str:
    source = path.read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return f"# `examples/{path.name}`\n\n{doc}\n\n```python\n{source}```\n"


def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "examples").glob("[!_]*.py")):
        files.append(File.generated(config, f"examples/{path.stem}.md", content=_example_page(path)))
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        uri = path.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
