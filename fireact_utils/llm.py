"""LM backends: one interface, a batch of prompts in, texts and token counts out.

    llm.generate(prompts, stop=["\\nObservation:"], max_new_tokens=128, temperature=0.0)
      -> list[Generation]   # same order as prompts

A prompt is a string (text completion) or a list of chat messages. The local model (optionally
with a PEFT adapter) decodes on a vLLM server the kit starts (`VLLMBackend`, the default where
.venv-vllm exists) or in-process with transformers' `model.generate` (`GenerateBackend`, which
needs no server); `OpenAIBackend` talks to any OpenAI-compatible endpoint (OpenAI, vLLM,
`transformers serve`) with concurrent requests and bounded retries. All cut the text at the
first stop (a string, or a pattern such as the end of an Action line), because some servers
(transformers serve) leave the stop text in and no server takes patterns.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .config import LLMParams, ModelParams
from .stops import Stop, cut_at_stop, stop_index

Prompt = str | list[dict]


def encode(tok, prompt: Prompt) -> np.ndarray:
    """Token ids of a text prompt (after the BOS its tokenizer wants, as training has it), or of
    chat messages in the model's template (which writes its own BOS)."""
    from .tokens import text_ids

    if isinstance(prompt, str):
        ids = text_ids(tok, prompt)
    else:
        enc = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return np.asarray(ids, dtype=np.int64)


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request failed for good (text is then "")
    token_ids: list[int] | None = None  # the ids sampled, where asked of a server that returns them


@runtime_checkable
class LLM(Protocol):
    """What the agent needs of a backend: a name, whether it takes chat messages (else text
    prompts), and a batch of prompts in, texts and token counts out (same order)."""

    name: str
    chat: bool

    def generate(self, prompts: list[Prompt], stop: list[Stop], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]: ...


@runtime_checkable
class StreamingLLM(LLM, Protocol):
    """A backend that serves follow-up prompts as earlier ones end (continuous batching):
    `on_done(key, generation)` returns the next (key, prompt) requests, which join the batch."""

    def stream(self, requests: list[tuple[object, Prompt]], stop: list[Stop], max_new_tokens: int,
               temperature: float, on_done: Callable[[object, Generation], list[tuple[object, Prompt]]]) -> None: ...


def _server_stops(stop: list[Stop]) -> list[str] | None:
    """The stop strings a server takes (patterns are applied to the text it returns)."""
    return [s for s in stop if isinstance(s, str)] or None


class OpenAIBackend:
    """Any OpenAI-compatible endpoint. The key is read from the environment variable named in
    params (never stored); a local `base_url` works without one."""

    RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, params: LLMParams | None = None):
        import openai

        self.p = params or LLMParams(backend="openai")
        key = os.environ.get(self.p.api_key_env)
        if not key:
            if self.p.base_url is None:
                raise RuntimeError(f"OpenAI backend needs an API key in ${self.p.api_key_env}")
            key = "EMPTY"  # local servers (vLLM, transformers serve) accept any key
        # We retry ourselves (bounded budget, Retry-After, jitter) so that failures are counted.
        self.client = openai.OpenAI(api_key=key, base_url=self.p.base_url, max_retries=0, timeout=self.p.timeout_s)
        self.name, self.chat = self.p.model, self.p.chat
        self.failures: list[str] = []
        self.retries = 0
        self._lock = threading.Lock()  # retries/failures are updated from `concurrency` threads

    def _once(self, prompt: Prompt | list[int], stop: list[Stop], max_new_tokens: int, temperature: float,
              seed: int | None = None, body: dict | None = None) -> Generation:
        """One request; `body`: fields a server takes beyond OpenAI's (vLLM's top_k, return_token_ids)."""
        extra: dict = {} if seed is None else {"seed": seed}
        if body:
            extra["extra_body"] = body
        if self.p.chat:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            r = self.client.chat.completions.create(model=self.p.model, messages=msgs, stop=_server_stops(stop),
                                                    max_tokens=max_new_tokens, temperature=temperature, **extra)
            text = r.choices[0].message.content or ""
        else:
            if not (isinstance(prompt, str) or all(isinstance(t, int) for t in prompt)):
                raise ValueError("text-completion backend (chat=False) needs string (or token id) prompts")
            r = self.client.completions.create(model=self.p.model, prompt=prompt, stop=_server_stops(stop),
                                               max_tokens=max_new_tokens, temperature=temperature, **extra)
            text = r.choices[0].text or ""
        u = getattr(r, "usage", None)
        return Generation(cut_at_stop(text, stop), getattr(u, "prompt_tokens", 0) or 0,
                          getattr(u, "completion_tokens", 0) or 0,
                          token_ids=getattr(r.choices[0], "token_ids", None))

    def _scrub(self, text: str) -> str:
        """`text` without the API key: a server may echo the Authorization header in its error body."""
        key = self.client.api_key
        return text.replace(key, "***") if key and key != "EMPTY" else text

    def _retry_delay(self, err: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying `err`, or None if it is not worth retrying."""
        import openai

        if isinstance(err, openai.APIStatusError):
            if err.status_code not in self.RETRYABLE_STATUS:
                return None
            after = err.response.headers.get("retry-after") if err.response is not None else None
            if after:
                try:
                    seconds = float(after)
                except ValueError:
                    seconds = -1.0  # an HTTP-date: back off ourselves
                if seconds >= 0:  # a negative or NaN header would make time.sleep raise
                    return seconds
        elif not isinstance(err, openai.APIConnectionError | openai.APITimeoutError):
            return None
        return min(2.0 ** attempt, 30.0) * (0.5 + random.random())  # exponential backoff, full jitter

    def _with_retries(self, prompt: Prompt | list[int], stop: list[Stop], max_new_tokens: int, temperature: float,
                      seed: int | None = None, body: dict | None = None) -> Generation:
        slept, attempt = 0.0, 0
        while True:
            try:
                return self._once(prompt, stop, max_new_tokens, temperature, seed, body)
            except Exception as e:  # noqa: BLE001 - every failure becomes a recorded error
                delay = self._retry_delay(e, attempt)
                if delay is None or attempt >= self.p.max_retries or slept + delay > self.p.retry_budget_s:
                    msg = f"{type(e).__name__}: {self._scrub(str(e))[:300]} (after {attempt} retries)"
                    with self._lock:
                        self.failures.append(msg)
                    return Generation("", error=msg)
                with self._lock:
                    self.retries += 1
                attempt += 1
                slept += delay
                time.sleep(delay)

    def generate(self, prompts: list[Prompt], stop: list[Stop], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        with ThreadPoolExecutor(self.p.concurrency) as pool:
            return list(pool.map(lambda p: self._with_retries(p, stop, max_new_tokens, temperature), prompts))


class VLLMBackend:
    """The local model on a vLLM server the kit runs (`serving.serve`), through `OpenAIBackend`.

    Prompts go as token ids from `encode`, so the engine sees exactly the tokens the in-process
    decoders see (no second tokenization with other special-token rules). Follow-up turns are
    sent as soon as the turn before ends (`stream`), so the engine's continuous batching always
    has the episodes that can run. The server starts at the first request, so conditions already
    saved cost no start (a busy port or a missing vLLM environment is an error at once). A
    fine-tuned LoRA adapter is loaded into the base model's server (vLLM serves adapters on CPU and
    GPU): base and fine-tuned conditions share one start.
    A server that dies mid-run is restarted once per failure and the failed turn retried; a turn
    that still fails is an `api_error` episode, re-run when the condition resumes. Sampling
    (temperature > 0) seeds each request from torch's seed and the prompt's tokens, so a sample
    run (`torch.manual_seed(j)`) draws the same tokens whatever order requests finish in, whole
    or resumed (one prompt sent twice in one run draws the same text twice).
    """

    chat = False

    def __init__(self, model_params: ModelParams | None = None, concurrency: int = 32):
        from transformers import AutoTokenizer

        from . import serving
        from .models import pick_device, pick_dtype, resolve_model

        mp = model_params or ModelParams()
        self.model_params, self.concurrency = mp, concurrency
        path = resolve_model(mp.name, mp.cache_dir)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.name = mp.name + (f"+{mp.adapter}" if mp.adapter else "")
        device = pick_device(mp.device)
        args = tuple(mp.vllm_args) + (("--enable-lora", "--max-lora-rank", str(_lora_rank(mp.adapter)))
                                      if mp.adapter else ())
        self.serve_kwargs = {"model": path, "dtype": str(pick_dtype(mp.dtype, device)).removeprefix("torch."),
                             "port": mp.vllm_port, "device": device,
                             "args": serving.default_args(device, mp.vllm_gpu_memory_utilization) + args}
        serving.check_can_serve(mp.vllm_port)  # a busy port or no vLLM: one line now, not at the first turn
        self._lock = threading.Lock()
        self.server = None  # started (or the running one reused) by the first request: `_ensure_server`

    def _ensure_server(self) -> None:
        """The server, at the first request: a backend built for conditions already saved starts
        none; one that a fine-tune stopped since (`serving.make_room`) is started again."""
        from . import serving

        with self._lock:
            if self.server is None or not self.server.alive():
                self._connect(serving.serve(**self.serve_kwargs))

    def _connect(self, server) -> None:
        """Talk to `server` (its adapter loaded): a short retry budget, as a dead server is restarted."""
        self.server = server
        adapter = self.model_params.adapter
        model = server.load_adapter(adapter) if adapter else None
        self.client = OpenAIBackend(LLMParams(backend="openai", model=model or server.name, base_url=server.base_url,
                                              chat=False, concurrency=self.concurrency, timeout_s=600.0,
                                              max_retries=2, retry_budget_s=10.0))

    def _one(self, ids: list[int], stop: list[Stop], max_new_tokens: int, temperature: float,
             seed: int | None = None, token_ids: bool = False) -> Generation:
        body: dict = {"return_token_ids": True} if token_ids else {}
        if temperature > 0:  # plain sampling, as `GenerateBackend`'s: no top-k/top-p from generation_config
            import torch

            body |= {"top_k": 0, "top_p": 1.0}
            if seed is None:
                seed = zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes(), torch.initial_seed() & 0xFFFFFFFF)
        server = self.server
        gen = self.client._with_retries(ids, stop, max_new_tokens, temperature, seed, body)
        if gen.error and not server.alive():
            from .serving import restart

            with self._lock:
                if self.server is server:  # the first thread to see the death restarts it
                    print(f"vLLM server died ({gen.error[:80]}); restarting", file=sys.stderr)
                    self._connect(restart(server))
            gen = self.client._with_retries(ids, stop, max_new_tokens, temperature, seed, body)
        return gen

    def continue_ids(self, ids: list[list[int]], stop: list[Stop], max_new_tokens: int, temperature: float = 0.0,
                     seeds: list[int] | None = None) -> list[list[int]]:
        """The ids the engine sampled after each prompt of `ids`, through the stop it ended at (GRPO's
        rollouts keep them as sampled); `seeds` one per prompt, so equal prompts can draw apart."""
        self._ensure_server()
        with ThreadPoolExecutor(self.concurrency) as pool:
            gens = list(pool.map(lambda a: self._one(a[0], stop, max_new_tokens, temperature, a[1], token_ids=True),
                                 zip(ids, seeds or [None] * len(ids), strict=True)))
        failed = next((g.error for g in gens if g.error), None)
        if failed:  # a rollout cannot be an api_error episode: GRPO would learn from its reward
            from .serving import ServerError

            raise ServerError(f"vLLM rollout failed: {failed} (log: {self.server.log})")
        return [g.token_ids or [] for g in gens]

    def close(self) -> None:
        """Unload this backend's adapter from its server (GRPO's per-step policies); the server
        keeps running for the next backend."""
        if self.server is not None and self.model_params.adapter:
            self.server.unload_adapter(self.client.name)

    def stream(self, requests: list[tuple[object, Prompt]], stop: list[Stop], max_new_tokens: int,
               temperature: float, on_done: Callable[[object, Generation], list[tuple[object, Prompt]]]) -> None:
        """Keep `concurrency` requests in flight: `on_done(key, generation)` runs as each one ends
        and returns follow-up (key, prompt) requests, sent before any request not yet started. So an
        episode's next turn never queues behind the first turns of every other episode: episodes
        end (and are saved) all along a condition, not all at its end, and a turn finds the turn
        before it still in the engine's prefix cache."""
        if requests:
            self._ensure_server()
        waiting = deque(requests)
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending: dict = {}

            def submit(key: object, prompt: Prompt) -> None:
                ids = encode(self.tok, prompt).tolist()
                pending[pool.submit(self._one, ids, stop, max_new_tokens, temperature)] = key

            while waiting or pending:
                while waiting and len(pending) < self.concurrency:
                    submit(*waiting.popleft())
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    for k, p in on_done(pending.pop(f), f.result()):
                        submit(k, p)

    def generate(self, prompts: list[Prompt], stop: list[Stop], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)

        def keep(i: int, gen: Generation) -> list:
            out[i] = gen
            return []

        self.stream(list(enumerate(prompts)), stop, max_new_tokens, temperature, keep)
        return out  # type: ignore[return-value]


def _lora_rank(adapter: str) -> int:
    """The smallest LoRA rank vLLM accepts that holds the adapter's."""
    import json
    from pathlib import Path

    r = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 8)
    return next(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r)


class _StopCriterion:
    """A `generate` stopping criterion: a row is done once its new text reaches one of `stop` (the
    same rule as every backend's cut) or any EOS id of the model's generation config (where
    `generate` stops it too: the pads after it are no tokens of it); `ends[row]` is how many new
    tokens it had then."""

    def __init__(self, tok, start: int, stop: list[Stop], eos: set[int]):
        self.tok, self.start, self.stop, self.ends, self.eos = tok, start, stop, {}, eos

    def __call__(self, input_ids, scores, **kw):
        import torch

        for row, ids in enumerate(input_ids.tolist()):
            if row not in self.ends:
                new = ids[self.start:]
                if new and (new[-1] in self.eos or stop_index(self.tok.decode(new), self.stop) is not None):
                    self.ends[row] = len(new)
        return torch.tensor([r in self.ends for r in range(input_ids.shape[0])], device=input_ids.device)


class GenerateBackend:
    """transformers' batched `model.generate`: left-padded chunks of `batch_size` prompts, each row
    stopped at its first stop or any EOS. The local path that needs no server (`decoder: auto`
    without .venv-vllm); RL rollouts use `continue_ids` on the policy being trained."""

    chat = False

    def __init__(self, model_params: ModelParams | None = None, batch_size: int = 32, model=None, tokenizer=None):
        from .models import load_model

        mp = model_params or ModelParams()
        given = model is not None  # weights handed in (a policy in training): their spec is unknown unless passed
        if model is None:
            model, tokenizer = load_model(mp.name, adapter=mp.adapter, cache=mp.cache_dir, device=mp.device,
                                          dtype=mp.dtype, merge=True)
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.model_params = None if given and model_params is None else mp
        self.name = mp.name + (f"+{mp.adapter}" if mp.adapter else "")

    def continue_ids(self, contexts: list[list[int]], stop: list[Stop], max_new_tokens: int,
                     temperature: float, seeds: list[int] | None = None) -> list[list[int]]:
        """Each context's new token ids, up to and including the token that ended it. Samples draw
        from torch's generator (`seeds`, for a server's per-request sampling, is not used)."""
        import torch

        from .tokens import eos_ids

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out: list[list[int]] = []
        for i in range(0, len(contexts), self.batch_size):
            chunk = contexts[i:i + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c in chunk], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=self.model.device)
            crit = _StopCriterion(self.tok, width, stop, eos_ids(self.tok, self.model.generation_config))
            sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
                else {"do_sample": False}
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          pad_token_id=pad, stopping_criteria=[crit], **sample)
            out += [gen[r, width:width + crit.ends.get(r, gen.shape[1] - width)].tolist() for r in range(len(chunk))]
        return out

    def generate(self, prompts: list[Prompt], stop: list[Stop], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        ids = [encode(self.tok, p).tolist() for p in prompts]
        news = self.continue_ids(ids, stop, max_new_tokens, temperature)
        return [Generation(cut_at_stop(self.tok.decode(n, skip_special_tokens=True), stop), len(i), len(n))
                for i, n in zip(ids, news, strict=True)]


def pick_decoder(mp: ModelParams) -> str:
    """`model.decoder`, with auto resolved: vLLM where its environment is installed (2.7x and
    1.9x the kit's former decoder on CPU, docs/speed.md), else `model.generate`, with a notice."""
    from .serving import vllm_python

    if mp.decoder != "auto":
        return mp.decoder
    if vllm_python() is not None:
        return "vllm"
    if not _NOTICED:
        print("model.decoder auto: no vLLM environment (`make setup` builds .venv-vllm), decoding with "
              "model.generate (several times slower on CPU)", file=sys.stderr)
        _NOTICED.append(True)
    return "generate"


_NOTICED: list[bool] = []  # the fallback notice is printed once per process


def local_backend(model: ModelParams | None = None, batch_size: int = 32) -> LLM:
    """The local model with the decoder `model.decoder` picks (`pick_decoder`)."""
    mp = model or ModelParams()
    decoder = pick_decoder(mp)
    if decoder == "vllm":
        return VLLMBackend(mp, concurrency=batch_size)
    return GenerateBackend(mp, batch_size=batch_size)


def make_llm(llm: LLMParams, model: ModelParams | None = None, batch_size: int = 32) -> LLM:
    if llm.backend == "openai":
        return OpenAIBackend(llm)
    if llm.backend == "vllm":
        model = (model or ModelParams()).model_copy(update={"decoder": "vllm"})
    return local_backend(model, batch_size)
