"""LM backends: one interface, a batch of prompts in, texts and token counts out.

    llm.generate(prompts, stop=["\\nObservation:"], max_new_tokens=128, temperature=0.0)
      -> list[Generation]   # same order as prompts

A prompt is a string (text completion) or a list of chat messages. `LocalBackend` runs
transformers (optionally with a PEFT adapter), batched, reusing keys/values of prompt prefixes;
`OpenAIBackend` talks to any OpenAI-compatible endpoint (OpenAI, vLLM, `transformers serve`)
with concurrent requests and bounded retries. Both cut the text at the first stop (a string, or a
pattern such as the end of an Action line), because some servers (transformers serve) leave the
stop text in and no server takes patterns.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .config import LLMParams, ModelParams
from .stops import Stop, cut_at_stop, stop_index

Prompt = str | list[dict]


def encode(tok, prompt: Prompt) -> np.ndarray:
    """Token ids of a text prompt, or of chat messages in the model's template."""
    if isinstance(prompt, str):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
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


class LocalBackend:
    """A transformers model (optionally with a merged PEFT adapter) on CPU or GPU.

    Decoding is `decoding.Decoder`, a short loop of our own rather than `model.generate`:
    continuous batching (a row leaves at its stop string; an episode's next turn joins the
    running batch), keys/values of prompt prefixes reused across rows and turns, and on CPU the
    exemplars all rows share attended once (`kvcache.prefix_attention`). Greedy outputs equal
    `model.generate`'s (tests/test_llm.py checks it).
    """

    def __init__(self, model_params: ModelParams | None = None, batch_size: int = 32, model=None, tokenizer=None,
                 prefix_cache: bool = True, cache_gib: float = 2.0):
        from .decoding import Decoder
        from .kvcache import PrefixStore
        from .models import load_model

        mp = model_params or ModelParams()
        if model is None:
            model, tokenizer = load_model(mp.name, adapter=mp.adapter, cache=mp.cache_dir, device=mp.device,
                                          dtype=mp.dtype, merge=True)
        self.model, self.tok = model, tokenizer
        self.name = mp.name + (f"+{mp.adapter}" if mp.adapter else "")
        self.chat = False  # prompts are text; a chat prompt (list of messages) is templated per call
        # Stored keys/values of past prompts; without it every prompt is prefilled in full.
        store = PrefixStore(int(cache_gib * 2**30)) if prefix_cache else None
        self.decoder = Decoder(model, tokenizer, batch_size, store)

    def _encode(self, prompt: Prompt) -> np.ndarray:
        return encode(self.tok, prompt)

    def stream(self, requests: list[tuple[object, Prompt]], stop: list[Stop], max_new_tokens: int,
               temperature: float, on_done: Callable[[object, Generation], list[tuple[object, Prompt]]]) -> None:
        """Generate for each (key, prompt); `on_done(key, generation)` runs as each one ends and
        returns follow-up (key, prompt) requests, which join the running batch."""
        def done(key, text: str, n_prompt: int, n_new: int):
            return [(k, self._encode(p)) for k, p in on_done(key, Generation(text, n_prompt, n_new))]

        self.decoder.run([(k, self._encode(p)) for k, p in requests], stop, max_new_tokens, temperature, done)

    def generate(self, prompts: list[Prompt], stop: list[Stop], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)

        def keep(i: int, gen: Generation) -> list:
            out[i] = gen
            return []

        self.stream(list(enumerate(prompts)), stop, max_new_tokens, temperature, keep)
        return out  # type: ignore[return-value]


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

    def _once(self, prompt: Prompt, stop: list[Stop], max_new_tokens: int, temperature: float) -> Generation:
        if self.p.chat:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            r = self.client.chat.completions.create(model=self.p.model, messages=msgs, stop=_server_stops(stop),
                                                    max_tokens=max_new_tokens, temperature=temperature)
            text = r.choices[0].message.content or ""
        else:
            if not isinstance(prompt, str):
                raise ValueError("text-completion backend (chat=False) needs string prompts")
            r = self.client.completions.create(model=self.p.model, prompt=prompt, stop=_server_stops(stop),
                                               max_tokens=max_new_tokens, temperature=temperature)
            text = r.choices[0].text or ""
        u = getattr(r, "usage", None)
        return Generation(cut_at_stop(text, stop), getattr(u, "prompt_tokens", 0) or 0,
                          getattr(u, "completion_tokens", 0) or 0)

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

    def _with_retries(self, prompt: Prompt, stop: list[Stop], max_new_tokens: int, temperature: float) -> Generation:
        slept, attempt = 0.0, 0
        while True:
            try:
                return self._once(prompt, stop, max_new_tokens, temperature)
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


class _StopCriterion:
    """A `generate` stopping criterion: a row is done once its new text reaches one of `stop` (the
    same rule as every backend's cut) or EOS; `ends[row]` is how many new tokens it had then."""

    def __init__(self, tok, start: int, stop: list[Stop]):
        self.tok, self.start, self.stop, self.ends = tok, start, stop, {}

    def __call__(self, input_ids, scores, **kw):
        import torch

        for row, ids in enumerate(input_ids.tolist()):
            if row not in self.ends:
                new = ids[self.start:]
                if new and (new[-1] == self.tok.eos_token_id or stop_index(self.tok.decode(new), self.stop) is not None):
                    self.ends[row] = len(new)
        return torch.tensor([r in self.ends for r in range(input_ids.shape[0])], device=input_ids.device)


class GenerateBackend:
    """transformers' batched `model.generate`: left-padded chunks of `batch_size` prompts, each row
    stopped at its first stop or EOS. The default on GPU, where the kit's decoder was not 1.5x
    faster (README, Speed); RL rollouts use `continue_ids` on the policy being trained."""

    chat = False

    def __init__(self, model_params: ModelParams | None = None, batch_size: int = 32, model=None, tokenizer=None):
        from .models import load_model

        mp = model_params or ModelParams()
        if model is None:
            model, tokenizer = load_model(mp.name, adapter=mp.adapter, cache=mp.cache_dir, device=mp.device,
                                          dtype=mp.dtype, merge=True)
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.name = mp.name + (f"+{mp.adapter}" if mp.adapter else "")

    def continue_ids(self, contexts: list[list[int]], stop: list[Stop], max_new_tokens: int,
                     temperature: float) -> list[list[int]]:
        """Each context's new token ids, up to and including the token that ended it."""
        import torch

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out: list[list[int]] = []
        for i in range(0, len(contexts), self.batch_size):
            chunk = contexts[i:i + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c in chunk], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=self.model.device)
            crit = _StopCriterion(self.tok, width, stop)
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


def local_backend(model: ModelParams | None = None, batch_size: int = 32) -> LLM:
    """The local model with the decoder `model.decoder` picks (auto: the kit's on CPU, generate on GPU)."""
    from .models import pick_device

    mp = model or ModelParams()
    decoder = mp.decoder if mp.decoder != "auto" else ("kit" if pick_device(mp.device) == "cpu" else "generate")
    return (LocalBackend if decoder == "kit" else GenerateBackend)(mp, batch_size=batch_size)


def make_llm(llm: LLMParams, model: ModelParams | None = None, batch_size: int = 32) -> LLM:
    if llm.backend == "openai":
        return OpenAIBackend(llm)
    return local_backend(model, batch_size)
