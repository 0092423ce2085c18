"""How each artifact was made: a stage's provenance record, and what a condition's meta says
about its run (model, agent settings, machine, tool counts, edits by hand).

A condition resumes only with the model and agent settings its meta records, so one name never
mixes two runs; tables read the machine and hand-edit notes to mark numbers that need them.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .io import atomic_write_json, read_json
from .models import ModelId, model_id

if TYPE_CHECKING:
    from .config import AgentParams, Params


def provenance(p: Params) -> dict:
    import torch
    import transformers

    from . import __version__

    return {"params": p.dump(), "fireact_utils": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": machine_label(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_provenance(p: Params, stage: str) -> None:
    atomic_write_json(p.run_dir / "provenance" / f"{stage}.json", provenance(p))


def machine_label() -> str:
    """Where this process computes: the GPU's name, else the CPU's core count."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


def llm_model(llm) -> tuple[ModelId, str | None]:
    """(model, dtype) of `llm` for a condition's meta. A local backend (it carries its
    `model_params`) is fingerprinted; another (HTTP, a test's script) is its name alone. The
    dtype is recorded, not compared: like the batch size, it changes float roundings, not the model
    (`recipes.seed_model` decodes in bf16 what trained in fp32)."""
    from .models import pick_device, pick_dtype

    mp = getattr(llm, "model_params", None)
    if mp is None:
        return ModelId(llm.name), None
    dtype = str(pick_dtype(mp.dtype, pick_device(mp.device))).removeprefix("torch.")
    return model_id(mp.name, mp.adapter, mp.cache_dir), dtype


def saved_model(meta: dict) -> ModelId | None:
    """The model a condition's meta records; None for a meta older than the record."""
    return ModelId(meta["model"], meta.get("model_fingerprint")) if meta.get("model") else None


def check_same_agent(saved: dict, agent: AgentParams, path: Path) -> None:
    """A condition continues only with the agent settings it began with (`saved`: its meta's), so
    one name never mixes two; the batch size, which only reorders float sums, may change."""
    now = agent.model_dump()
    differ = [k for k in now if k != "batch_size" and k in saved and saved[k] != now[k]]
    if differ:
        changes = ", ".join(f"agent.{k} {saved[k]!r} -> {now[k]!r}" for k in differ)
        raise ValueError(f"{path} was run with other agent settings ({changes}): "
                         "run it with its own, or pick a new run name")


def merge_tool_stats(old: dict | None, new: dict) -> dict:
    """Tool statistics of a resumed condition: counts summed; rates (fractions of calls) averaged
    with the calls as weights, so they cover every run, not only the last."""
    if not old:
        return dict(new)
    out = dict(new)
    calls_old, calls_new = old.get("calls", 0), new.get("calls", 0)
    for k, v in new.items():
        if k not in old or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if k.endswith("_rate") and k != "noise_rate":
            total = calls_old + calls_new
            out[k] = (old[k] * calls_old + v * calls_new) / total if total else 0.0
        elif isinstance(v, int) and k != "recorded_pairs":  # a size, not a count of calls
            out[k] = old[k] + v
    return out


def hand_edit(meta: dict) -> str | None:
    """A condition meta's note that a person edited it (`edited_by_hand`; older metas: `repaired`),
    so every table and figure showing its numbers can mark them."""
    note = meta.get("edited_by_hand") or meta.get("repaired")
    return None if not note else note if isinstance(note, str) else "meta repaired by hand"


def condition_meta(p: Params, name: str) -> dict:
    f = p.run_dir / "eval" / f"{name}.meta.json"
    return read_json(f) if f.is_file() else {}
