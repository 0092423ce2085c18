"""The kit's vLLM server lifecycle (`serving`) on real processes and real loopback HTTP, with a
stand-in for vLLM (`servers.fake_vllm`) that is up in a fraction of a second: which thread may
start a server, what kills it, which server on a port the kit trusts, and how it pins CPUs.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import ModelListServer, fake_vllm

from fireact_utils import serving

# A run of the kit in another process: it starts a server from a short-lived thread (as
# `VLLMBackend` restarts a dead one from its request pool), prints the server's pid and waits.
KIT_RUN = """
import sys, threading, time
from fireact_utils import serving
started = []
t = threading.Thread(target=lambda: started.append(serving.serve(sys.argv[1])))
t.start()
t.join()
print(started[0].proc.pid, flush=True)
time.sleep(300)
"""


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it is dead, waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(pid)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """The stand-in vLLM as this process's vLLM interpreter, logs in tmp_path, CPU binding left to the kit."""
    path = fake_vllm(tmp_path)
    monkeypatch.setenv("FIREACT_VLLM_PYTHON", str(path))
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    yield path
    serving.stop_all()


@contextmanager
def kit_run(fake: Path, model: str):
    """Another kit process serving `model` (started from a thread that has ended): (process, server pid)."""
    env = {**os.environ, "FIREACT_VLLM_PYTHON": str(fake)}
    kit = subprocess.Popen([sys.executable, "-c", KIT_RUN, model], stdout=subprocess.PIPE, text=True, env=env)
    pid = None
    try:
        pid = int(kit.stdout.readline())
        yield kit, pid
    finally:
        kit.kill()
        kit.wait()
        if pid and _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_server_outlives_the_thread_that_started_it_and_dies_with_the_process(fake, tmp_path):
    """Linux sends PR_SET_PDEATHSIG when the thread that forked the child exits: a server started
    from a worker thread must still run once that thread is gone, and die when its process is killed
    outright (SIGKILL: no atexit runs)."""
    with kit_run(fake, str(tmp_path / "model")) as (kit, pid):
        time.sleep(1.0)  # the starting thread ended before the pid was printed; the signal is immediate
        assert _running(pid), "the server died with the thread that started it"
        kit.kill()
        assert _gone_within(pid, 10.0), "the server outlived the process that started it"


def test_a_server_restarted_from_a_worker_thread_keeps_running(fake, tmp_path):
    """`VLLMBackend._one` restarts a dead server from a request thread; the new server (with a new
    name of its own) is still up after that thread, and its pool, are gone."""
    first = serving.serve(str(tmp_path / "model"))
    first.proc.kill()
    first.proc.wait()
    out = []
    worker = threading.Thread(target=lambda: out.append(serving.restart(first)))
    worker.start()
    worker.join()
    time.sleep(0.5)
    new = out[0]
    assert new.alive() and new.ready()
    assert new.name != first.name and new.name.startswith(serving.SERVED_PREFIX)


def test_another_server_on_the_port_is_refused(fake, tmp_path, monkeypatch):
    """The port `free_port` picked is taken (by another run's server) before vLLM binds it: that
    server answers /health too, but /v1/models names another model, so the kit refuses it in one
    line instead of evaluating the other run's model under its own fingerprint."""
    with ModelListServer(["fireact-0123456789ab"]) as port:
        monkeypatch.setattr(serving, "free_port", lambda: port)
        with pytest.raises(serving.ServerError) as err:
            serving.serve(str(tmp_path / "model"))
    msg = str(err.value)
    assert msg.startswith(f"port {port} is answered by another server (serving fireact-0123456789ab), "
                          "not the vLLM server this run started (fireact-")
    assert msg.endswith("set model.vllm_port to a free one (0 picks one)") and "\n" not in msg
    assert not serving._running


def test_a_second_runs_server_is_not_pinned_to_the_first_ones_cores(fake, tmp_path):
    """Each server pins one OpenMP thread to every core; a server started while another run's is up
    would pin its threads to the same cores, so it leaves placement to the OS."""
    def binding(pid: int) -> str:
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        return env["VLLM_CPU_OMP_THREADS_BIND"]

    alone = serving.serve(str(tmp_path / "alone"))
    assert binding(alone.proc.pid) == f"0-{os.cpu_count() - 1}"
    serving.stop_all()
    with kit_run(fake, str(tmp_path / "theirs")) as (_, theirs):
        ours = serving.serve(str(tmp_path / "ours"))
        assert (binding(theirs), binding(ours.proc.pid)) == (f"0-{os.cpu_count() - 1}", "nobind")
        assert serving.other_runs_servers() == {theirs}  # ours is not another run's
    assert serving.cpu_binding(set()) == f"0-{os.cpu_count() - 1}" and serving.cpu_binding({1234}) == "nobind"
