"""examples/quickstart.ipynb runs top to bottom (tiny model, few steps)."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes(exported_tiny_model, chain_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CGML_MODEL_DIR", str(exported_tiny_model))
    monkeypatch.setenv("CGML_DATA_DIR", str(chain_data_dir))
    monkeypatch.setenv("CGML_STEPS", "15")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "15 learned steps" in text and "<Rg^2> reference" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot was drawn
    assert (tmp_path / "learned_log.csv").exists()
