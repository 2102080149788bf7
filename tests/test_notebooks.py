"""The notebooks: committed clean, each with its badge, install cell and small switch, and run top to bottom.

Each notebook is executed on the CPU in a fresh kernel (nbclient + ipykernel) with
GEMMA_JAX_NOTEBOOK_SMALL=1, the switch every notebook reads to shrink its sizes, and must show at
least one plot or table. The kernel inherits this process's environment: JAX_PLATFORMS=cpu and 8
fake CPU devices from conftest.py, and the model cache ($GEMMA_JAX_CACHE or ~/.cache/gemma_jax),
where 01_quickstart converts the embedded model once.
"""

from __future__ import annotations

import json
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_sharding.ipynb", "03_fp8.ipynb", "04_sppo.ipynb"]
COLAB = "https://colab.research.google.com/github/{org}/gemma_jax/blob/main/notebooks/{name}"
CELL_TIMEOUT_S = 600


def _cells(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_all_notebooks_present():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    """Outputs and execution counts stay out of git: clear them before committing (Jupyter: Clear All Outputs)."""
    dirty = [
        i
        for i, cell in enumerate(_cells(path))
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_badge_install_cell_and_small_switch(path):
    cells = _cells(path)
    first = _source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and "colab-badge.svg" in first
    assert COLAB.format(org="gemma-jax", name=path.name) in first, "the badge must open this notebook"
    install = next(c for c in cells if c["cell_type"] == "code")
    assert 'find_spec("gemma_jax") is None' in _source(install) and "%pip install" in _source(install)
    code = "\n".join(_source(c) for c in cells if c["cell_type"] == "code")
    assert 'os.environ.get("GEMMA_JAX_NOTEBOOK_SMALL") == "1"' in code
    assert "jax.default_backend()" in code, "each notebook says which accelerator it runs on"


def _shows_plot_or_table(nb) -> bool:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data or "|---" in data.get("text/markdown", ""):
                return True
    return False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("GEMMA_JAX_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    assert _shows_plot_or_table(nb), f"{path.name} shows no plot (image/png) or Markdown table"
