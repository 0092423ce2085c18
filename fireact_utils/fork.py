"""A run begun from another run's outputs, so an exercise extends the demo under a name of its own
instead of overwriting the demo's tables:

    python -m fireact_utils fork outputs/runs/cpu outputs/runs/ex03_200
    python -m fireact_utils run params/cpu.yaml name=ex03_200 evaluate.n_questions=200 --only 03_evaluate

The copy holds what the stages reuse (the dataset, the fine-tuned model with its key and log,
every condition's episodes and meta, teacher episodes, sweeps' fine-tunes); each is reused only
under its own key (`keys`), so a forked run computes exactly what a fresh one would, minus the work
already saved. Left out: optimizer checkpoints (GBs, needed only to resume an unfinished
fine-tune, which then starts over), and what the new run's notebooks make again (tables, figures,
executed notebooks, provenance, the resolved params, a pre-registration: a fork is another run).
"""

from __future__ import annotations

import shutil
from pathlib import Path

LEFT_OUT = ("tables", "figures", "notebooks", "provenance", "params.json", "preregistration.json")  # at the top


def fork(src: str | Path, dest: str | Path) -> Path:
    """Copy run dir `src` to `dest` (which must not exist yet) without `LEFT_OUT` and checkpoints."""
    src, dest = Path(src), Path(dest)
    if not (src / "eval").is_dir() and not (src / "finetune").is_dir():
        raise ValueError(f"{src} is not a run directory (no eval/ or finetune/), e.g. outputs/runs/cpu")
    if dest.exists():
        raise ValueError(f"{dest} exists: a fork starts a new run; pick another name")

    def skip(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == src
        return {n for n in names if n.startswith("checkpoint-") or (top and n in LEFT_OUT)}

    shutil.copytree(src, dest, ignore=skip)
    return dest


def fork_main(src: str, dest: str) -> int:
    """`python -m fireact_utils fork SRC DEST`: the copy, then the name to run it under."""
    out = fork(src, dest)
    print(f"forked {src} into {out}; run it with name={out.name} (and output_root={out.parent} "
          "where that is not the params' output_root)")
    return 0
