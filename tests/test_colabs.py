"""The colabs are executed (with small settings) so they cannot rot."""
import os

import nbformat
from nbclient import NotebookClient
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["lookupvit_quickstart.ipynb"])
def test_colab_runs(name, fmnist, tmp_path, monkeypatch):
  src = fmnist.source_dir
  monkeypatch.setenv("VITJAX_COLAB_SMALL", "1")
  monkeypatch.setenv("VITJAX_COLAB_SOURCE_DIR", src)
  monkeypatch.setenv("VITJAX_COLAB_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  nb = nbformat.read(os.path.join(ROOT, "colabs", name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "grid   7x7" in outputs and "accuracy" in outputs, outputs[-2000:]
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
