"""The papermill chain: which kernel it runs, a console that holds only its own lines, and the
closing line that names the results."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

from fireact_utils import chain
from fireact_utils.chain import chain_kernel, results_line, run_chain

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"


@pytest.mark.parametrize("ours", [True, False], ids=["this-venv", "stale"])
def test_chain_kernel_runs_this_interpreter_only(tmp_path, monkeypatch, ours):
    """A `fireact` kernel spec runs the chain only if it launches this interpreter: one left by
    another (or a deleted) clone would run other code, or nothing; then the default kernel runs it."""
    spec = tmp_path / "kernels" / "fireact"
    spec.mkdir(parents=True)
    python = sys.executable if ours else str(tmp_path / "gone" / "bin" / "python")
    (spec / "kernel.json").write_text(json.dumps({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                                  "display_name": "FireAct", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before the user's and the venv's kernels
    assert chain_kernel() == ("fireact" if ours else "python3")


def test_results_line_names_what_exists(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    assert results_line(run) == (f"results in {run}: headline table tables/main.md (not made yet), "
                                 "figures figures/, executed notebooks notebooks/*.html")
    (run / "tables").mkdir()
    (run / "tables" / "main.md").write_text("| condition |\n")
    assert "(not made yet)" not in results_line(run)


def _stderr_outputs(ipynb: Path) -> list[str]:
    nb = nbformat.read(str(ipynb), as_version=4)
    return [o["text"] for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stderr"]


def _bars(ipynb: Path) -> list[str]:
    """Every output of an executed notebook that looks like a progress bar (`  0%|`, `3/3 [`)."""
    nb = nbformat.read(str(ipynb), as_version=4)
    texts = [o.get("text") or "".join(o.get("data", {}).get("text/plain", "")) for c in nb.cells for o in c.get("outputs", [])]
    return [t for t in texts if re.search(r"\d+%\||\d+/\d+ \[", t)]


def test_chain_console_is_clean(tmp_path, monkeypatch, capfd):
    """A notebook through the chain: the console (this process's and the kernel's file descriptors)
    shows the chain's lines only, no kernel warning (the kernel gets CurveZMQ keys, so ipykernel does
    not warn about plain TCP), and ends with the results line; the notebook holds no stderr output."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    params = nbformat.v4.new_code_cell('params_file = "x"\noverrides = []')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(  # the kit's progress bar and datasets' (saving a dataset): both off
        "import tempfile, datasets\nfrom fireact_utils.agent import progress_bar\n"
        "bar = progress_bar(3, 'episodes')\nbar.update(3)\nbar.close()\n"
        "datasets.Dataset.from_dict({'a': [1, 2]}).save_to_disk(tempfile.mkdtemp())")
    nb = nbformat.v4.new_notebook(cells=[params, body], metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                                  "display_name": "Python 3"}})
    nbformat.write(nb, str(nb_dir / "tiny.ipynb"))
    monkeypatch.setattr(chain, "NOTEBOOK_DIR", nb_dir)
    for var in chain.QUIET:
        monkeypatch.setenv(var, "0")  # restored afterwards ...
        monkeypatch.delenv(var)  # ... and unset here: the chain turns the bars off itself
    run = run_chain(SMOKE, [f"output_root={tmp_path}"], notebooks=("tiny",), html=False)
    out, err = capfd.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[done] tiny in ") and lines[1] == results_line(run)
    assert _stderr_outputs(run / "notebooks" / "tiny.ipynb") == []
    assert _bars(run / "notebooks" / "tiny.ipynb") == []


@pytest.mark.slow
def test_walkthrough_notebook_has_no_stderr(tmp_path, capfd):
    """The cheapest notebook of the kit, with smoke params, writes nothing to stderr: no warning
    from the kit's imports, no progress bars."""
    run = run_chain(SMOKE, [f"output_root={tmp_path}", "model.decoder=generate"], notebooks=("00_walkthrough",),
                    html=False)
    assert capfd.readouterr().err == ""
    assert _stderr_outputs(run / "notebooks" / "00_walkthrough.ipynb") == []
