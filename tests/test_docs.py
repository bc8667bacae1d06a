"""The documentation: every public name has a docstring and a place in the API reference, and every
code block of the README and of the docs' Getting started runs."""

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import competitive

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"


def _attribute_docstring(module, name: str) -> str | None:
    """The string literal right after ``name = ...`` at module level (how griffe documents a variable)."""
    body = ast.parse(inspect.getsource(module)).body
    for node, after in zip(body, body[1:]):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return after.value.value
    return None


@pytest.mark.parametrize("name", competitive.__all__)
def test_every_public_name_has_a_docstring_and_a_reference_entry(name):
    obj = getattr(competitive, name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        doc = inspect.getdoc(obj)
        assert doc and obj.__doc__, f"competitive.{name} has no docstring"
    else:  # a variable: its docstring is the string literal after its assignment
        module = next(m for m in (sys.modules[k] for k in list(sys.modules) if k.startswith("competitive"))
                      if m is not None and name in vars(m) and _attribute_docstring(m, name))  # fmt: skip
        assert _attribute_docstring(module, name)
    assert re.search(rf"^::: competitive\.{name}$", REFERENCE.read_text(), re.M), f"{name} is not in docs/reference.md"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/index.md", "docs/guides/lm.md", "docs/guides/tasks.md"])
def test_every_python_block_runs(page, tmp_path):
    if page.endswith(("lm.md", "tasks.md")):
        pytest.importorskip("transformers")  # the examples extra
    blocks = _python_blocks(ROOT / page)
    assert blocks, f"{page} has no python block"
    # the blocks of a page run in order in one fresh interpreter, as a reader pastes them
    script = tmp_path / "blocks.py"
    script.write_text("\n\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_every_shell_block_is_a_command_of_run_sh(page):
    # the two commands CI runs (.ci/run): a shell block holds nothing else
    known = set(re.findall(r"^  (\w+)\)", (ROOT / "run.sh").read_text(), re.M))
    for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / page).read_text(), re.M | re.S):
        for line in filter(None, (line.split("#")[0].strip() for line in block.splitlines())):
            assert re.fullmatch(r"bash run\.sh (\w+)", line) and line.split()[-1] in known, line


def test_the_site_builds_strict_and_fetches_nothing(tmp_path):
    # mkdocs comes with the docs extra (bash run.sh installs it); without it there is nothing to build
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    env = {**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20 and (site / "reference" / "index.html").exists()
    for page in pages:  # no web font, script or stylesheet from another host
        html = page.read_text()
        assert not re.search(r"<(script|link)[^>]+(src|href)=\"https?://", html), page
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html, page
    for name in ("timm_pair", "segmentation_pair"):
        assert (site / "examples" / name / "index.html").exists()
