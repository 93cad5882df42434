"""The notebooks, executed top to bottom in a Jupyter kernel as a user runs them (each one's time printed at the
end of the run: a figure, not a verdict); committed without outputs; every figure written as a PNG."""

import json
import os
import time

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")
# name -> the figures it writes
BOOKS = {
    "01_explore": ["explore_routing.png", "explore_devices.png"],
    "02_finetune": ["finetune_loss.png"],
    "03_plan_a_pod": ["plan_presets.png", "plan_recorded.png"],
}


def test_notebooks_are_committed_without_outputs():
    found = sorted(f[:-6] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
    assert found == sorted(BOOKS), found
    for name in found:
        book = json.load(open(os.path.join(NOTEBOOKS, f"{name}.ipynb")))
        for i, cell in enumerate(book["cells"]):
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, (
                    f"notebooks/{name}.ipynb cell {i} is committed with outputs; clear them "
                    "(jupyter nbconvert --clear-output --inplace)")


def _execute(book, cwd, timeout=600):
    from nbclient import NotebookClient

    NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()


@pytest.mark.parametrize("name", sorted(BOOKS))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch, record_property, libtpu_env, small_tokenizer,
                                     hf_tiny):
    import nbformat

    figures = BOOKS[name]
    monkeypatch.setenv("K2JAX_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("K2JAX_TOKENIZER", small_tokenizer.path)  # instead of training the default one
    monkeypatch.setenv("K2JAX_HF_DIR", hf_tiny[0])
    monkeypatch.setenv("K2JAX_PROGRESS", "0")  # (libtpu_env: notebook 03 compiles for TPU beside parallel tests)
    book = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    t0 = time.perf_counter()
    _execute(book, NOTEBOOKS)
    record_property("seconds", f"notebooks/{name}.ipynb ran top to bottom in {time.perf_counter() - t0:.0f} s")
    for png in figures:
        data = open(tmp_path / png, "rb").read()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_a_broken_call_in_a_notebook_fails(tmp_path):
    """Positive control: a cell calling an API that does not exist stops the run with its error."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import k2jax\nk2jax.load_presets('tiny')")])
    with pytest.raises(CellExecutionError, match="load_presets"):
        _execute(book, str(tmp_path), timeout=120)
