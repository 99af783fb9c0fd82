"""notebooks/quickstart.ipynb runs from top to bottom and shows a heatmap."""

import shutil
import subprocess
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The "python3" kernel spec runs `python`, which jupyter_client resolves to this interpreter (the venv's).
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert (tmp_path / "quickstart_run" / "results.json").is_file()
    # What it writes next to itself (it runs in notebooks/) is git-ignored.
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["quickstart_data", "quickstart_run"]
    if shutil.which("git") and (NOTEBOOK.parent.parent / ".git").exists():
        for name in written:
            assert (
                subprocess.run(
                    ["git", "check-ignore", "-q", f"notebooks/{name}/x"], cwd=NOTEBOOK.parent.parent
                ).returncode
                == 0
            ), name
