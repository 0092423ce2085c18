"""LM backends: one interface, a batch of prompts in, texts and token counts out.

    llm.generate(prompts, stop=["\\nObservation:"], max_new_tokens=128, temperature=0.0)
      -> list[Generation]   # same order as prompts

A prompt is a string (text completion) or a list of chat messages. `LocalBackend` runs
transformers (optionally with a PEFT adapter), batched, reusing keys/values of prompt prefixes;
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

import numpy as np

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
    """transformers model on CPU/GPU; batches of `batch_size` sorted by length to limit padding.

    Decoding is our own short loop rather than `model.generate`, for two reasons that make
    batched rollouts several times faster on a CPU: a row leaves the batch as soon as it hits a
    stop string (generate keeps computing finished rows until the longest one ends), and
    keys/values of tokens seen before (the few-shot exemplars; an episode's earlier turns) come
    from a `PrefixStore` instead of being prefilled again (see `kvcache`). Greedy outputs match
    `model.generate`'s (tests/test_llm.py checks it).
    """

    def __init__(self, model_params: ModelParams | None = None, batch_size: int = 32, model=None, tokenizer=None,
                 prefix_cache: bool = True, cache_gib: float = 4.0, min_prefix_tokens: int = 32):
        from .kvcache import PrefixStore, supports_buffers
        from .models import load_model

        mp = model_params or ModelParams()
        if model is None:
            model, tokenizer = load_model(mp.name, adapter=mp.adapter, cache=mp.cache_dir, device=mp.device,
                                          dtype=mp.dtype, merge=True)
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self.name = mp.name + (f"+{mp.adapter}" if mp.adapter else "")
        self.buffers = supports_buffers(model.config)
        # Stored KV of past prompts; None = prefill every prompt in full (the naive way).
        self.store = PrefixStore(int(cache_gib * 2**30)) if prefix_cache and self.buffers else None
        self.min_prefix_tokens = min_prefix_tokens  # a shorter common prefix is not worth a batch-1 prefill
        self.prompt_tokens = self.cached_prompt_tokens = 0  # prompt tokens seen / found in the store

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tok(prompt, add_special_tokens=False)["input_ids"]
        enc = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    def _lookup(self, rows: list[np.ndarray]) -> list:
        """Per row: (stored entry, how many of its leading tokens it covers). The batch's common
        prefix (the few-shot exemplars) is computed once and stored when no entry covers it."""
        from .kvcache import Entry, common_prefix, prefill_kv

        hits = [self.store.longest(r) for r in rows]
        self.cached_prompt_tokens += sum(n for _, n in hits)
        shared = min(min(common_prefix(rows[0], r) for r in rows), min(len(r) for r in rows) - 1)
        if len(rows) > 1 and shared >= self.min_prefix_tokens and any(n < shared for _, n in hits):
            ids = rows[0][:shared]
            entry = Entry(ids, prefill_kv(self.model, ids.tolist()))
            self.store.add(ids, entry.kv)
            hits = [(entry, shared) if n < shared else (e, n) for e, n in hits]
        return hits

    def generate(self, prompts: list[Prompt], stop: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        import torch

        from .kvcache import batch_cache

        encoded = [np.asarray(self._encode(p), dtype=np.int64) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[Generation | None] = [None] * len(prompts)
        n_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = [encoded[i] for i in idx]
            hits = self._lookup(rows) if self.store is not None else [(None, 0)] * len(rows)
            cached = max(n for _, n in hits)
            width = cached + max(len(r) - n for r, (_, n) in zip(rows, hits, strict=True))
            ids = torch.full((len(rows), width), self.tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (r, (_, n)) in enumerate(zip(rows, hits, strict=True)):
                ids[j, cached - n:cached], mask[j, cached - n:cached] = torch.from_numpy(r[:n]), 1  # from the store
                ids[j, width - len(r) + n:], mask[j, width - len(r) + n:] = torch.from_numpy(r[n:]), 1  # to prefill
            if self.buffers:
                cache = batch_cache(hits, cached, width + max_new_tokens, n_layers)
            else:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
            self.prompt_tokens += sum(len(r) for r in rows)
            new = self._decode(ids, mask, cached, cache, stop, max_new_tokens, temperature, rows)
            for toks, i in zip(new, idx, strict=True):
                text = self.tok.decode(toks, skip_special_tokens=True)
                out[i] = Generation(cut_at_stop(text, stop), len(encoded[i]), len(toks))
        return out  # type: ignore[return-value]

    def _decode(self, ids, mask, cached: int, cache, stop: list[str], max_new_tokens: int, temperature: float,
                rows: list[np.ndarray]) -> list[list[int]]:
        """New tokens of each row, greedy or sampled. A row leaves the batch (its cache rows are
        dropped) once it emits EOS or a stop string; its keys/values then go to the store."""
        import torch

        from .kvcache import row_kv

        device = self.model.device
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # pads do not advance positions
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tok.eos_token_id} - {None}
        new: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))  # batch row -> index in `rows`
        step_ids, step_pos = ids[:, cached:], pos[:, cached:]
        with torch.inference_mode():
            for step in range(max_new_tokens):
                logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache,
                                    use_cache=True, logits_to_keep=1).logits[:, -1].float()
                if temperature > 0:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                last = step == max_new_tokens - 1
                keep = []
                for j, t in enumerate(nxt.tolist()):
                    toks = new[live[j]]
                    if t not in eos:
                        toks.append(t)
                        if not last and not (stop and any(s in self.tok.decode(toks[-16:]) for s in stop)):
                            keep.append(j)
                            continue
                    if self.store is not None:  # the row is done: keep what it computed for its next turn
                        cols = mask[j].nonzero()[:, 0]
                        seq = np.concatenate([rows[live[j]], np.asarray(toks, dtype=np.int64)])[:len(cols)]
                        self.store.add(seq, row_kv(cache, j, cols))
                if not keep:
                    break
                if len(keep) < len(live):
                    sel = torch.tensor(keep, device=device)
                    cache.batch_select_indices(sel)
                    mask, nxt, step_pos = mask[sel], nxt[sel], step_pos[sel]
                    live = [live[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
        return new


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
