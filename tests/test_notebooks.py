"""The tutorial notebooks: committed clean, executed top to bottom in a real Jupyter kernel.

Progress in a notebook is checked the same way: nbclient runs code in an IPython kernel (no
terminal) and the test reads what the kernel sent back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SHARED = ROOT.parent / "shared"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _run(nb, cwd: Path, timeout: int = 600):
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def _texts(nb) -> list[str]:
    """Every output of every cell as text (streams, display data and its updates, errors)."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if "text" in o:
                out.append(o["text"])
            out += [str(v) for v in o.get("data", {}).values()]
    return out


def test_there_are_two_tutorials():
    assert [p.name for p in NOTEBOOKS] == [
        "01-convolutions-and-feature-maps.ipynb",
        "02-transfer-learning.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} carries outputs: clear them"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"


def test_progress_is_live_in_a_notebook(tmp_path):
    """A fit in a kernel draws updating HTML bars and leaves one line per phase."""
    nbf = nbformat.v4
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import make_image
from pathlib import Path
import transferlab
root = Path({str(tmp_path / "data")!r})
for split, n in (("train", 4), ("val", 2), ("test", 2)):
    for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for i in range(n):
            make_image(root / split / cls / f"{{i}}.jpg", (40, 32), color=colour, seed=i)
clf = transferlab.fit(root, backbone="mobilenetv2_035", pretrained=False, engine="torch",
                      workers=0, cache_dir={str(tmp_path / "cache")!r})
clf
"""
    nb = _run(nbf.new_notebook(cells=[nbf.new_code_cell(code)]), tmp_path, timeout=300)
    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    bars = [o for o in outputs if o.output_type == "display_data" and "transient" not in o]
    html = " ".join(str(o.data.get("text/html", "")) for o in bars)
    # nbclient applies update_display_data in place: each bar ends as its phase's summary line
    assert "checking images: 16/16 in" in html, html
    assert "features [train]: 8/8 in" in html, html
    card = [o for o in outputs if o.output_type == "execute_result"][0]
    assert "transferlab Classifier" in card.data["text/html"]


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    if not (SHARED / "datasets").is_dir():
        pytest.skip(f"{SHARED} (datasets and weights) is not here")
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("TRANSFERLAB_TUTORIAL", "quick")
    t0 = time.perf_counter()
    _run(nb, EXAMPLES)
    seconds = time.perf_counter() - t0
    print(f"{path.name}: {seconds:.0f} s")
    if os.environ.get("TRANSFERLAB_NOTEBOOK_OUT"):  # keep the executed copy (a CI artifact)
        out = Path(os.environ["TRANSFERLAB_NOTEBOOK_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / path.name)
    texts = _texts(nb)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 5, f"only {figures} figures shown inline"
    assert any("in " in t and ": " in t and "/" in t for t in texts)  # progress lines
