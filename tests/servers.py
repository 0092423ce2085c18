"""Real local servers for tests: `transformers serve`, a fault-injecting OpenAI-shaped server, and
a stand-in for vLLM that the kit's own server lifecycle (`serving`) can start in a fraction of a second.

    with transformers_serve(model_path) as served:          # Served(base_url, model, log)
        OpenAIBackend(LLMParams(backend="openai", base_url=served.base_url, model=served.model))

    with FaultServer([Fault("429", times=2)], upstream=served.base_url) as fs:
        ...  # first two requests get 429 + Retry-After, the rest are forwarded

`FaultServer` is plain `http.server` in a daemon thread on 127.0.0.1 at a free port. Each
request takes the first `Fault` that still has uses left and matches its body; with none it is
forwarded to `upstream` or answered with a canned chat/text completion built by `reply`.

    monkeypatch.setenv("FIREACT_VLLM_PYTHON", str(fake_vllm(tmp_path)))  # serving.serve starts it
    with ModelListServer(["fireact-other"]) as port: ...   # someone else's server on a loopback port

    with FileServer(www).running() as base: ...            # static files, Range requests, cut connections
    data, hop = downloaded_data(tmp, data_dir, multihop_dir)  # the data as `fireact download` fetches them
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, NamedTuple

DEFAULT_REPLY = "Thought: canned.\nAction: finish[canned]"


def free_port() -> int:
    """A port the OS just reported free (a tiny race remains until the server binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET (body None) or POST JSON; returns (status, body) for any HTTP status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- transformers serve


class Served(NamedTuple):
    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    model: str  # the server is pinned to this model; requests must name it
    log: Path


def serve_command(model_path: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    cli = str(exe) if exe.is_file() else shutil.which("transformers") or "transformers"
    return [cli, "serve", model_path, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--log-level", "warning"]


@contextmanager
def transformers_serve(model_path: str, log_dir: Path, startup_s: float = 180.0) -> Iterator[Served]:
    """Run `transformers serve` pinned to `model_path` until the block exits (always stopped).

    Ready means /health answers and one 1-token completion went through: the first request
    pays the lazy warm-up (tens of seconds on a busy 2-core box), so tests don't.
    """
    port = free_port()
    log = log_dir / f"transformers-serve-{port}.log"
    # One OpenMP thread: the test process computes too, and two processes each spinning a thread
    # per core thrash a small shared box (measured: 8 tokens 1.1 s -> 0.5 s on 2 busy cores).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "wb") as logf:
        # Own process group: stopping it kills anything the CLI started, and nothing else.
        proc = subprocess.Popen(serve_command(model_path, port), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not ready after {startup_s} s:\n{log.read_text()[-3000:]}")
            try:
                if _http(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        status, body = _http(f"{base}/v1/completions", {"model": model_path, "prompt": "Hi", "max_tokens": 1},
                             timeout=max(1.0, deadline - time.monotonic()))
        if status != 200:
            raise RuntimeError(f"transformers serve warm-up failed: HTTP {status} {body[:300]!r}")
        yield Served(f"{base}/v1", model_path, log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- fault injection


FaultKind = Literal["429", "500", "slow", "drop", "echo_auth"]


@dataclass
class Fault:
    """What to do to the next `times` requests whose body contains `match` (None: any request).

    429/500: that status with a JSON error body and `retry_after` (None: no header).
    slow:    sleep `delay_s`, then answer normally (the client has usually timed out by then).
    drop:    read the request, close the connection without a response.
    echo_auth: 401 whose body echoes the Authorization header (a careless server; secrets test).
    """

    kind: FaultKind
    times: int = 1
    match: str | None = None
    retry_after: str | None = "0"
    delay_s: float = 1.0


def canned_body(path: str, request: dict, text: str) -> dict:
    """An OpenAI-shaped completion of `text` for /chat/completions or /completions."""
    prompt = request.get("messages") or request.get("prompt") or ""
    usage = {"prompt_tokens": len(json.dumps(prompt).split()), "completion_tokens": max(1, len(text.split()))}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    common = {"id": "canned-1", "created": 0, "model": request.get("model", "canned"), "usage": usage}
    if path.endswith("/chat/completions"):
        return {**common, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}
    return {**common, "object": "text_completion", "choices": [{"index": 0, "finish_reason": "stop", "text": text}]}


class FaultServer:
    """OpenAI-compatible HTTP server that injects faults; see the module docstring."""

    def __init__(self, faults: list[Fault] | None = None, upstream: str | None = None,
                 reply: Callable[[dict], str] | None = None):
        self.faults = list(faults or [])
        self.upstream = upstream.rstrip("/") if upstream else None  # .../v1
        self.reply = reply or (lambda request: DEFAULT_REPLY)
        self.log: list[tuple[str, str]] = []  # (path, what happened): fault kind, "forwarded" or "canned"
        self.auth_seen: list[str] = []  # Authorization headers received
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def outcomes(self) -> list[str]:
        with self._lock:
            return [what for _, what in self.log]

    def _take_fault(self, body: bytes) -> Fault | None:
        text = body.decode("utf-8", "replace")
        with self._lock:
            for f in self.faults:
                if f.times > 0 and (f.match is None or f.match in text):
                    f.times -= 1
                    return f
        return None

    def _record(self, path: str, what: str) -> None:
        with self._lock:
            self.log.append((path, what))

    def __enter__(self) -> FaultServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: dict | bytes, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "canned", "object": "model"}]})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.auth_seen.append(self.headers.get("Authorization", ""))
                fault = server._take_fault(raw)
                if fault is not None:
                    server._record(self.path, fault.kind)
                    if fault.kind == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault.kind in ("429", "500"):
                        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                        msg = "rate limited (injected)" if fault.kind == "429" else "server error (injected)"
                        return self._send(int(fault.kind), {"error": {"message": msg, "type": "injected"}}, headers)
                    if fault.kind == "echo_auth":
                        auth = self.headers.get("Authorization", "")
                        return self._send(401, {"error": {"message": f"bad credentials: {auth}"}})
                    time.sleep(fault.delay_s)  # slow: then answer normally below
                self._answer(raw, recorded=fault is not None)

            def _answer(self, raw: bytes, recorded: bool) -> None:
                if server.upstream:
                    path = self.path[len("/v1"):] if self.path.startswith("/v1") else self.path
                    status, body = _http(server.upstream + path, json.loads(raw), timeout=300)
                    if not recorded:
                        server._record(self.path, "forwarded")
                    return self._send(status, body)
                request = json.loads(raw or b"{}")
                if not recorded:
                    server._record(self.path, "canned")
                self._send(200, canned_body(self.path, request, server.reply(request)))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True  # a handler still sleeping for a "slow" fault never blocks exit
        self._httpd.block_on_close = False
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


# ---------------------------------------------------------------- the kit's vLLM server, stood in for

FAKE_VLLM = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

a = sys.argv
name, port = a[a.index("--served-model-name") + 1], int(a[a.index("--port") + 1])


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = {"/health": {}, "/v1/models": {"object": "list", "data": [{"id": name, "object": "model"}]}}.get(self.path)
        data = json.dumps(body).encode()
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def fake_vllm(directory: Path) -> Path:
    """An executable to set as $FIREACT_VLLM_PYTHON: run with the kit's server command line
    (`-m vllm.entrypoints.openai.api_server ... --served-model-name N --port P ...`), it answers
    /health and lists N at /v1/models on P, as vLLM does once up, in a fraction of a second."""
    path = directory / "fake-vllm-python"
    path.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    path.chmod(0o755)
    return path


class ModelListServer:
    """A loopback server that is up (/health 200) and serves `names` at /v1/models: another
    run's vLLM server, as the kit sees it on a port. The port is what `with` gives."""

    def __init__(self, names: list[str]):
        self.names = names
        self._httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> int:
        names = self.names

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
                data = json.dumps(body if self.path == "/v1/models" else {}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self._httpd.server_address[1]

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


class FileServer:
    """Serves `root` on 127.0.0.1 with `Range: bytes=N-` support (unless `ranges` is False). `cut`
    maps a URL path to a byte count: its first request sends the full Content-Length, that many
    bytes, then drops the connection. A daemon thread, shut down on exit or after `max_s`."""

    def __init__(self, root: Path, cut: dict[str, int] | None = None, ranges: bool = True, max_s: float = 60.0):
        self.root, self.cut, self.ranges, self.max_s = root, dict(cut or {}), ranges, max_s
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @contextmanager
    def running(self) -> Iterator[str]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                f = server.root / self.path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                body = f.read_bytes()
                start = int(rng[6:-1]) if server.ranges and (rng := self.headers.get("Range")) else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if (n := server.cut.pop(self.path, None)) is not None:
                    self.wfile.write(body[start:start + n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        stop = threading.Timer(self.max_s, httpd.shutdown)
        stop.daemon = True
        stop.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        finally:
            stop.cancel()
            httpd.shutdown()
            httpd.server_close()


def downloaded_data(root: Path, data_dir: Path, multihop_dir: Path | None) -> tuple[Path, Path]:
    """The data as a fresh machine gets them: FireAct's files (and the multihop ones, unless
    `multihop_dir` is None) served from loopback in their hosts' layouts (FireAct's repository:
    `trajs/` at its root, the rest under `data/`) and fetched by `fireact download` into empty dirs
    under `root`. Returns (FireAct data dir, multihop dir)."""
    from fireact_utils.cli import main

    www = root / "www"
    (www / "fire" / "data").mkdir(parents=True)
    for f in data_dir.iterdir():
        (www / "fire" / ("trajs" if f.name == "trajs" else f"data/{f.name}")).symlink_to(f)
    if multihop_dir is not None:
        (www / "hop").symlink_to(multihop_dir)
    data, hop = root / "data", root / "multihop"
    with FileServer(www, max_s=600).running() as base:
        args = ["download", "--dest", str(data), "--multihop-dest", str(hop), "--base-url", base + "fire/"]
        args += ["--only", "fireact"] if multihop_dir is None else ["--multihop-url", base + "hop/"]
        assert main(args) == 0
    return data, hop
