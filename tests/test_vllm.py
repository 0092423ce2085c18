"""`model.decoder: vllm`: the kit's own vLLM server (real server in .venv-vllm, real model).

The server tests are slow (each start is ~1-3 min of engine warm-up on 2 cores); they run in
an order that reuses one server where they can.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fireact_utils import serving
from fireact_utils.config import ModelParams, load_params
from fireact_utils.llm import pick_decoder

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"


def test_a_port_in_use_is_a_one_line_error(tmp_path, model_path):
    """Before anything starts (and whether or not vLLM is installed): the CLI says which port and
    what to set, in one line, and exits 2."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fireact_utils", "evaluate", str(SMOKE), f"output_root={tmp_path}",
                            f"model.name={model_path}", "model.decoder=vllm", f"model.vllm_port={port}"],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: port {port} is in use: set model.vllm_port to a free one (0 picks one)"


def test_auto_without_vllm_falls_back_with_one_notice(capsys):
    assert serving.vllm_python() is None  # conftest hides it
    assert pick_decoder(ModelParams(device="cpu")) == "generate"
    assert pick_decoder(ModelParams(device="cpu", decoder="generate")) == "generate"
    err = capsys.readouterr().err
    assert err.count("no vLLM environment") <= 1  # once per process, whichever test asked first


def test_the_server_starts_at_the_first_request_not_when_the_backend_is_built(tmp_path, model_path, local_llm,
                                                                              monkeypatch):
    """A vLLM backend for a condition already saved starts no server (a notebook that re-reads
    saved conditions pays no start); the first real request starts one, and a server that cannot
    start (here an interpreter without vLLM) is one error naming its log, the saved episodes kept."""
    from fireact_utils import pipeline
    from fireact_utils.llm import local_backend

    p = load_params(SMOKE, [f"output_root={tmp_path}", f"model.name={model_path}", "evaluate.n_questions=2",
                            "agent.max_turns=1"])
    saved = pipeline.run_condition(p, "fewshot", local_llm, pipeline.fewshot_react(p), progress=False)
    monkeypatch.setenv("FIREACT_VLLM_PYTHON", sys.executable)  # "vLLM" that cannot start
    llm = local_backend(p.model.model_copy(update={"decoder": "vllm"}), 2)
    assert pipeline.run_condition(p, "fewshot", llm, pipeline.fewshot_react(p), progress=False) == saved
    assert llm.server is None and not serving._running
    with pytest.raises(serving.ServerError, match=r"exited with 1 while starting: see .*\.log$"):
        pipeline.run_condition(p, "fewshot_more", llm, pipeline.fewshot_react(p), n=3, progress=False)
    assert pipeline.saved_condition(p, "fewshot") == saved


def _lora(model_path: str, out: Path) -> str:
    """A real PEFT adapter with non-zero weights (B != 0), so the fine-tuned model differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(out)
    return str(out)


def _steps(records: list[dict]) -> dict:
    return {r["id"]: json.dumps(r["steps"]) for r in records}


@pytest.fixture(scope="module")
def lora_dir(model_path, tmp_path_factory) -> str:
    return _lora(model_path, tmp_path_factory.mktemp("lora") / "adapter")


class TurnByTurn:
    """A backend's `generate` alone (no `stream`): the agent then runs all episodes turn by turn."""

    def __init__(self, llm):
        self.llm, self.name, self.chat = llm, llm.name, llm.chat

    def generate(self, *a, **kw):
        return self.llm.generate(*a, **kw)


@pytest.mark.slow
def test_vllm_evaluates_both_agents_as_model_generate_does(tmp_path, model_path, lora_dir, vllm_python):
    """Few-shot ReAct on the base model and the fine-tuned (adapter) agent, end to end through
    `run_condition`: every step of every episode equals `model.generate`'s (greedy, fp32). On the
    few-shot server: streamed turns give the turn-by-turn episodes, and sampling is seeded by torch's
    seed. The adapter's server stays up for the next test (which stops it; so does the exit)."""
    import torch

    from fireact_utils import pipeline
    from fireact_utils.agent import run_episodes
    from fireact_utils.llm import local_backend
    from fireact_utils.tools import RecordedSearch
    from fireact_utils.train import adapter_model_params

    for agent, mp_of in (("fewshot", lambda p: p.model), ("finetuned", lambda p: adapter_model_params(p.model, lora_dir))):
        runs = {}
        for decoder in ("vllm", "generate"):
            p = load_params(SMOKE, [f"output_root={tmp_path / decoder}", f"model.name={model_path}",
                                    f"model.decoder={decoder}", "evaluate.n_questions=3", "agent.max_turns=3"])
            ap = pipeline.fewshot_react(p) if agent == "fewshot" else pipeline.finetuned_agent(p)
            llm = local_backend(mp_of(p), p.agent.batch_size)
            runs[decoder] = pipeline.run_condition(p, agent, llm, ap, progress=False)
            assert not any(r["status"] == "api_error" for r in runs[decoder])
        assert _steps(runs["vllm"]) == _steps(runs["generate"]), agent
        if agent == "fewshot":
            vllm = local_backend(mp_of(p).model_copy(update={"decoder": "vllm"}), 8)  # the running server
            task, idx = pipeline.condition_questions(p)
            turnwise = run_episodes(task, idx, TurnByTurn(vllm), RecordedSearch(), ap, progress=False)
            assert _steps(turnwise) == _steps(runs["vllm"])
            assert sum(r["turns"] for r in turnwise) > len(idx)  # some episode took a second turn
            sampled = []
            for seed in (7, 7, 8):
                torch.manual_seed(seed)
                sampled.append([g.text for g in vllm.generate(["Once upon a time", "In a land"], [], 12,
                                                               temperature=1.0)])
            assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.slow
def test_a_server_that_dies_mid_run_is_restarted_and_the_condition_completes(tmp_path, model_path, lora_dir,
                                                                              vllm_python):
    """SIGKILL the engine's whole process group while episodes run: the backend restarts it and
    retries the failed turns; whatever still failed is an api_error that a resume re-runs."""
    import threading

    from fireact_utils import pipeline
    from fireact_utils.llm import local_backend
    from fireact_utils.train import adapter_model_params

    p = load_params(SMOKE, [f"output_root={tmp_path}", f"model.name={model_path}", "model.decoder=vllm",
                            "evaluate.n_questions=6", "agent.max_turns=3", "agent.batch_size=2"])
    llm = local_backend(adapter_model_params(p.model, lora_dir), p.agent.batch_size)
    episodes = p.run_dir / "eval" / "finetuned.jsonl"
    killed = []

    def kill_after_first_episode():
        while not (episodes.is_file() and episodes.read_text().strip()):
            time.sleep(0.2)
        killed.append(llm.server)  # started by the first request
        os.killpg(killed[0].proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_episode, daemon=True)
    killer.start()
    try:
        recs = pipeline.run_condition(p, "finetuned", llm, pipeline.finetuned_agent(p), progress=False)
        killer.join(5)
        first = killed[0]
        assert not first.alive() and llm.server is not first and llm.server.alive()
        if any(r["status"] == "api_error" for r in recs):  # a turn lost in the crash: the resume re-runs it
            recs = pipeline.run_condition(p, "finetuned", llm, pipeline.finetuned_agent(p), progress=False)
        assert len(recs) == 6 and not any(r["status"] == "api_error" for r in recs)
    finally:
        serving.stop_all()


@pytest.mark.slow
def test_seeded_samples_of_long_prompts_at_once_keep_the_engine_up(model_path, vllm_python, capsys):
    """Sampled episodes (votes, GRPO groups) send seeded requests whose prompts together outgrow one
    engine step: on a CPU, vLLM 0.32 with chunked prefill split a prompt across steps, rewound its
    seeded sampler with a CUDA-only call ("CPU Generator does not use offset") and died. The kit's
    CPU server takes whole prompts (`serving.default_args`): every sample comes back, no restart."""
    from fireact_utils.llm import VLLMBackend

    llm = VLLMBackend(ModelParams(name=model_path, device="cpu", decoder="vllm"), concurrency=12)
    prompts = [f"Question {i}: " + "the history of the river and the towns along it " * 120 for i in range(12)]
    try:
        gens = llm.generate(prompts, [], max_new_tokens=8, temperature=1.0)
        assert min(g.prompt_tokens for g in gens) > 1000  # 12 prompts > 1,000 tokens: over one step's budget
        assert not [g.error for g in gens if g.error] and llm.server.alive()
        assert "server died" not in capsys.readouterr().err
    finally:
        serving.stop_all()


CHILD = """
import sys, time
from fireact_utils import serving
s = serving.serve(sys.argv[1])
print(s.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_no_server_outlives_a_killed_process(model_path, vllm_python):
    """The process that started a server is SIGKILLed (no atexit runs): the kernel's parent-death
    signal still takes the server and its engine processes down."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, model_path], stdout=subprocess.PIPE, text=True,
                             env=os.environ.copy())
    try:
        pgid = int(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    deadline = time.time() + 120
    while time.time() < deadline and _group_alive(pgid):
        time.sleep(1)
    left = _group_alive(pgid)
    if left:
        os.killpg(pgid, signal.SIGKILL)
    assert not left, "vLLM processes outlived the process that started them"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    rows = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.splitlines()
    # Zombies count as gone: they hold no memory or port.
    return any(int(g) == pgid and not st.startswith("Z") for g, st in (r.split() for r in rows if r.strip()))
