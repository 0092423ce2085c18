"""Shared test setup: point FIREACT_DATA_DIR / FIREACT_MULTIHOP_DIR at the shared copies of the data."""

import os
from pathlib import Path

import pytest

from fireact_utils import config, serving

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "fireact"
SHARED_MULTIHOP = REPO_ROOT.parent / "shared" / "multihop"

if SHARED_DATA.is_dir():
    os.environ.setdefault("FIREACT_DATA_DIR", str(SHARED_DATA))
if SHARED_MULTIHOP.is_dir():
    os.environ.setdefault("FIREACT_MULTIHOP_DIR", str(SHARED_MULTIHOP))
# Converted model and search indexes are cached once per checkout (CI: the clone's .cache).
os.environ.setdefault("FIREACT_CACHE", str(REPO_ROOT / ".cache"))
# `model.decoder: auto` picks vLLM where it is installed; tests start a server only where they
# test one (tests/test_vllm.py, through the `vllm_python` fixture), every other test decodes in-process.
# Looked up once, in pytest's first process: xdist's workers inherit its environment, "off" included.
os.environ.setdefault("FIREACT_TEST_VLLM_PYTHON", str(serving.vllm_python() or ""))
VLLM_PYTHON = Path(os.environ["FIREACT_TEST_VLLM_PYTHON"]) if os.environ["FIREACT_TEST_VLLM_PYTHON"] else None
os.environ["FIREACT_VLLM_PYTHON"] = "off"


def _located_or_skip(locate) -> Path:
    """A data dir; the tests that read it are skipped (with the reason) without one."""
    try:
        return locate()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The FireAct data dir."""
    return _located_or_skip(config.data_dir)


@pytest.fixture(scope="session")
def multihop_dir() -> Path:
    """The multihop Wikipedia data (questions + paragraphs)."""
    return _located_or_skip(config.multihop_dir)


# ---------------------------------------------------------------- the built-in model, local and served

# Captured at import, before any test's monkeypatch can point FIREACT_CACHE at a temp dir:
# the converted model (540 MB, ~25 s to build) must be built once and reused.
_MODEL_CACHE = Path(os.environ["FIREACT_CACHE"]) / "models" if os.environ.get("FIREACT_CACHE") else None


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """Directory of the built-in model (smollm2-135m) as a plain HF checkpoint."""
    from fireact_utils.models import resolve_model

    return resolve_model("smollm2-135m", _MODEL_CACHE or tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def _local_backend(model_path):
    from fireact_utils.config import ModelParams
    from fireact_utils.llm import GenerateBackend

    return GenerateBackend(ModelParams(name=model_path, device="cpu"), batch_size=8)


@pytest.fixture
def one_thread():
    """One torch thread while the test runs (why: `local_llm`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_llm(_local_backend):
    """A GenerateBackend on the built-in model, CPU, loaded once per session; one torch thread while
    the test runs. On a shared 2-core box, two OpenMP threads stall whenever another process holds
    a core: a 16-token batch measured 35 s with 2 threads against 3 s with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _local_backend
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served_model(model_path, tmp_path_factory):
    """A real `transformers serve` on 127.0.0.1 pinned to the built-in model: Served(base_url, model, log).

    Started on first use, stopped at the end of the session (or when startup fails)."""
    from servers import transformers_serve

    with transformers_serve(model_path, tmp_path_factory.mktemp("serve")) as served:
        yield served


@pytest.fixture
def vllm_python(monkeypatch) -> Path:
    """The vLLM environment's interpreter, made visible to the kit for this test. Skipped where
    vLLM is not installed, unless $FIREACT_REQUIRE_VLLM is set (CI: it installs vLLM, so a
    missing one is a failure there, not a skip)."""
    if VLLM_PYTHON is None:
        if os.environ.get("FIREACT_REQUIRE_VLLM"):
            pytest.fail("no vLLM environment, and $FIREACT_REQUIRE_VLLM is set: `make setup` should build .venv-vllm")
        pytest.skip("no vLLM environment (`make setup` builds .venv-vllm)")
    monkeypatch.setenv("FIREACT_VLLM_PYTHON", str(VLLM_PYTHON))
    return VLLM_PYTHON
