"""The README's Python example runs as written on the bundled model; its links resolve."""
import os
import re

from helpers import ROOT, run_script


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_python_example_runs_as_written(tmp_path):
    """The README's one Python block, from a directory holding the repository's assets (the example's relative
    paths), on the bundled model: it calibrates W4A8, samples on the integer backend and writes its grid."""
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert len(blocks) == 1
    (tmp_path / "example.py").write_text(blocks[0])
    os.symlink(os.path.join(ROOT, "assets"), tmp_path / "assets")
    proc = run_script(tmp_path / "example.py", cwd=tmp_path, env={"PYTHONPATH": ROOT}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alphas = re.search(r"\{'blocks\.0\.attn\.qkv': ([0-9.]+|None).*\}", proc.stdout)  # None: no smoothing kept
    assert alphas and alphas.group(0).count("blocks.") == 32, proc.stdout[-2000:]
    assert (tmp_path / "w4a8.png").stat().st_size > 0


def test_readme_is_short_and_its_links_resolve():
    text = _readme()
    assert len(text.splitlines()) <= 250
    for md in ("README.md", "docs/USAGE.md", "docs/BENCHMARKS.md", "docs/ARCHITECTURE.md", "docs/REPRODUCE.md"):
        with open(os.path.join(ROOT, md)) as f:
            body = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", body):
            path = link.split("#")[0]
            if path and not link.startswith("http"):
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(md), path)), (md, link)
