"""LM backends: one interface, a batch of prompts in, texts and token counts out.

    llm.generate(prompts, stop=["\\nObservation:"], max_new_tokens=128, temperature=0.0)
      -> list[Generation]   # same order as prompts

A prompt is a string (text completion) or a list of chat messages. `LocalBackend` runs
transformers (optionally with a PEFT adapter) with left-padded batched `generate`;
`OpenAIBackend` talks to any OpenAI-compatible endpoint (OpenAI, vLLM, `transformers serve`)
with concurrent requests and bounded retries. Both cut the text at the first stop string,
because some servers (transformers serve) leave the stop text in.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from .config import LLMParams, ModelParams

Prompt = str | list[dict]


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request failed for good (text is then "")


class LLM(Protocol):
    name: str

    def generate(self, prompts: list[Prompt], stop: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]: ...


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text up to the earliest stop string (which is dropped)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class LocalBackend:
    """transformers model on CPU/GPU; batches of `batch_size` sorted by length to limit padding."""

    def __init__(self, model_params: ModelParams | None = None, batch_size: int = 32, model=None, tokenizer=None):
        from .models import load_model

        mp = model_params or ModelParams()
        if model is None:
            model, tokenizer = load_model(mp.name, adapter=mp.adapter, cache=mp.cache_dir, device=mp.device,
                                          dtype=mp.dtype, merge=True)
        self.model, self.tok = model, tokenizer
        self.tok.padding_side = "left"  # decoder-only batching: new tokens must line up at the right
        self.batch_size = batch_size
        self.name = mp.name + (f"+{mp.adapter}" if mp.adapter else "")

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tok(prompt, add_special_tokens=False)["input_ids"]
        enc = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    def generate(self, prompts: list[Prompt], stop: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        import torch

        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[Generation | None] = [None] * len(prompts)
        pad = self.tok.pad_token_id
        device = self.model.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i])
                mask[row, width - n:] = 1
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, tokenizer=self.tok,
                          stop_strings=stop or None)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=1.0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = gen[:, width:].cpu()
            for row, i in enumerate(idx):
                toks = [t for t in new[row].tolist() if t != pad]
                text = self.tok.decode(toks, skip_special_tokens=True)
                out[i] = Generation(cut_at_stop(text, stop), len(encoded[i]), len(toks))
        return out  # type: ignore[return-value]


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
        self.name = self.p.model
        self.failures: list[str] = []
        self.retries = 0
        self._lock = threading.Lock()  # retries/failures are updated from `concurrency` threads

    def _once(self, prompt: Prompt, stop: list[str], max_new_tokens: int, temperature: float) -> Generation:
        if self.p.chat:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            r = self.client.chat.completions.create(model=self.p.model, messages=msgs, stop=stop or None,
                                                    max_tokens=max_new_tokens, temperature=temperature)
            text = r.choices[0].message.content or ""
        else:
            if not isinstance(prompt, str):
                raise ValueError("text-completion backend (chat=False) needs string prompts")
            r = self.client.completions.create(model=self.p.model, prompt=prompt, stop=stop or None,
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

    def _with_retries(self, prompt: Prompt, stop: list[str], max_new_tokens: int, temperature: float) -> Generation:
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

    def generate(self, prompts: list[Prompt], stop: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        with ThreadPoolExecutor(self.p.concurrency) as pool:
            return list(pool.map(lambda p: self._with_retries(p, stop, max_new_tokens, temperature), prompts))


def make_llm(llm: LLMParams, model: ModelParams | None = None, batch_size: int = 32) -> LLM:
    if llm.backend == "openai":
        return OpenAIBackend(llm)
    return LocalBackend(model, batch_size=batch_size)
