"""The papermill chain: the six notebooks executed in order into <run>/notebooks/, each exported
to HTML, resumable (a notebook whose executed copy finished is skipped).

    python -m fireact_utils run params/cpu.yaml            # = make demo

The console shows one line per notebook and a closing line naming the results. The kernels get
CurveZMQ keys from their manager (the kernelspecs declare support), so ipykernel does not warn
that it talks over plain TCP; progress bars are off (`QUIET`), so the HTML holds no bar lines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import keys
from .config import load_params
from .io import atomic_write_json, read_json
from .provenance import provenance

NOTEBOOKS = ("00_walkthrough", "01_generate_trajectories", "02_finetune", "03_evaluate", "04_scaling_and_robustness",
             "05_beyond_sft")
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
QUIET = ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")  # the kit's, datasets', transformers'
KERNEL_CONFIG = {"KernelManager": {"transport_encryption": "auto"}}  # CurveZMQ keys where the kernelspec supports them


def run_chain(params_file: str | Path, overrides: list[str] | None = None, notebooks=NOTEBOOKS,
              html: bool = True, redo: bool = False) -> Path:
    """Execute the notebooks in order into run_dir/notebooks/. A notebook whose executed copy
    finished under the same settings (its marker's key) is skipped, so a killed chain resumes at the
    first unfinished one; one finished under other settings is refused naming them, unless `redo`
    (which executes every notebook again, each stage recomputing only what other settings made)."""
    import papermill as pm
    from traitlets.config import Config

    p = load_params(params_file, overrides)  # fail on bad params before any kernel starts
    nb_dir = p.run_dir / "notebooks"
    now = keys.make("notebook", keys.run_settings(p))
    if redo:  # the kernels inherit it: every stage recomputes what another key made
        os.environ[keys.REDO_ENV] = "1"
    todo = notebooks if redo else [nb for nb in notebooks
                                   if not keys.reuse(nb_dir / f"{nb}.done", now, saved=_done_key(nb_dir / f"{nb}.done"),
                                                     where=nb_dir / f"{nb}.ipynb")]
    nb_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p.run_dir / "params.json", provenance(p))
    for var in QUIET:  # the kernels inherit them: no progress bars in the saved notebooks
        os.environ.setdefault(var, "1")
    kernel = chain_kernel()
    config = Config(KERNEL_CONFIG)
    for nb in notebooks:
        done = nb_dir / f"{nb}.done"
        if nb not in todo:
            print(f"[skip] {nb} (executed with these settings; --redo executes it again)")
            continue
        t0 = time.time()
        out = nb_dir / f"{nb}.ipynb"
        pm.execute_notebook(str(NOTEBOOK_DIR / f"{nb}.ipynb"), str(out), cwd=str(NOTEBOOK_DIR),
                            parameters={"params_file": str(Path(params_file).resolve()),
                                        "overrides": list(overrides or [])},
                            kernel_name=kernel, progress_bar=False, config=config)
        if html:
            export_html(out)
        atomic_write_json(done, {"seconds": time.time() - t0, "kernel": kernel, "key": now})
        print(f"[done] {nb} in {time.time() - t0:.0f}s")
    print(results_line(p.run_dir))
    return p.run_dir


def _done_key(done: Path) -> dict | None:
    """The key a notebook's marker records (None: a marker older than keys)."""
    return read_json(done).get("key") if done.is_file() else None


def results_line(run_dir: Path) -> str:
    """The chain's closing line: where the run's results are; a part no notebook has made yet says so."""
    def where(rel: str) -> str:
        return rel if (run_dir / rel).exists() else f"{rel} (not made yet)"

    return (f"results in {run_dir}: headline table {where('tables/main.md')}, figures {where('figures/')}, "
            "executed notebooks notebooks/*.html")


def chain_kernel() -> str:
    """The Jupyter kernel the chain runs in: `fireact` (the .venv kernel `make setup` registers) when
    it runs this interpreter, else the default `python3`. A `fireact` spec left by another clone (or
    by a deleted one) would run other code, or nothing."""
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec("fireact").argv
    except NoSuchKernel:
        return "python3"
    return "fireact" if Path(argv[0]).absolute() == Path(sys.executable).absolute() else "python3"


def export_html(ipynb: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(ipynb), as_version=4))
    out = ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
