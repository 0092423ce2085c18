"""Continuous batching for agent rollouts on a local transformers model.

Turn-by-turn batching (every episode generates, then every episode acts) waits each turn for
its slowest row: one episode rambling to `max_new_tokens` holds the 31 that stopped after 20
tokens. Here a row leaves the batch the moment it ends; its episode acts (the tool call) and
its next prompt joins the running batch. Joining is cheap because keys/values of everything an
episode has seen come from the `PrefixStore` (see `kvcache`): only the new observation is
prefilled. New rows are prefilled as a group and merged into the running batch once at least
as many join as run, so the cache copy a merge costs stays small.

`Decoder.run` is the loop; `LocalBackend.generate` is `run` with no follow-up prompts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .kvcache import BufferLayer, Entry, PrefixStore, batch_cache, common_prefix, prefill_kv, row_kv, supports_buffers
from .llm import cut_at_stop

Request = tuple[object, np.ndarray]  # (caller's key, prompt token ids)


@dataclass
class Row:
    key: object
    ids: np.ndarray  # the prompt
    new: list[int] = field(default_factory=list)  # generated so far
    done: bool = False  # ended, but still in the batch until the next compaction


@dataclass
class Batch:
    """Rows being decoded. `mask` covers the cache's columns (0 = pad); `nxt` holds each row's
    latest token, sampled but not yet fed to the model."""

    rows: list[Row]
    cache: object
    mask: torch.Tensor
    nxt: torch.Tensor | None = None

    @property
    def live(self) -> list[int]:
        return [j for j, r in enumerate(self.rows) if not r.done]

    def compact(self, force: bool = False) -> None:
        """Drop ended rows. It copies the whole cache, so unless forced it waits until a quarter
        have ended; until then they ride along (a step costs far less than linear in batch size)."""
        keep = self.live
        if not keep:
            self.rows = []
        elif len(keep) < len(self.rows) and (force or 4 * (len(self.rows) - len(keep)) >= len(self.rows)):
            sel = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(sel)
            self.mask, self.nxt = self.mask[sel], self.nxt[sel]
            self.rows = [self.rows[j] for j in keep]


class Decoder:
    def __init__(self, model, tokenizer, batch_size: int, store: PrefixStore | None, min_prefix_tokens: int = 32):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        # Preallocated buffers (and so merging and the store) only for plain full-attention models.
        self.buffers = supports_buffers(model.config)
        self.store = store if self.buffers else None
        self.min_prefix_tokens = min_prefix_tokens  # a shorter common prefix is not worth a batch-1 prefill
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id} - {None}
        # Prompt tokens seen, and those a row did not prefill itself (stored, or a shared prefix run once).
        self.prompt_tokens = self.cached_prompt_tokens = 0

    def run(self, requests: list[Request], stop: list[str], max_new_tokens: int, temperature: float,
            on_done: Callable[[object, str, int, int], list[Request]]) -> None:
        """Generate for every request; `on_done(key, text, prompt_tokens, completion_tokens)` is
        called as each ends and returns follow-up requests (an episode's next turn), served first."""
        pending = deque(sorted(requests, key=lambda r: len(r[1])))  # similar lengths pad less
        batch: Batch | None = None
        with torch.inference_mode():
            while pending or batch is not None:
                live = len(batch.live) if batch else 0
                joining = min(len(pending), self.batch_size - live)
                # A merge copies the running rows' caches: wait until at least as many rows join as run.
                if joining and (live == 0 or (self.buffers and joining >= live)):
                    group = [pending.popleft() for _ in range(joining)]
                    ended = []
                    for new, logits in self._prefill(group, max_new_tokens):
                        ended += self._advance(new, logits, stop, max_new_tokens, temperature)
                        if new.rows:
                            batch = new if batch is None else self._merge(batch, new, max_new_tokens)
                else:
                    ended = self._advance(batch, self._step(batch), stop, max_new_tokens, temperature)
                if batch is not None and not batch.rows:
                    batch = None
                for row in ended:
                    text = cut_at_stop(self.tok.decode(row.new, skip_special_tokens=True), stop)
                    pending.extendleft(reversed(on_done(row.key, text, len(row.ids), len(row.new))))

    def _lookup(self, ids: list[np.ndarray]) -> list[tuple[Entry | None, int]]:
        """Per row: (stored entry, how many of its leading tokens it covers). The group's common
        prefix (the few-shot exemplars) is computed once and stored when no entry covers it."""
        if self.store is None:
            return [(None, 0)] * len(ids)
        hits = [self.store.longest(r) for r in ids]
        shared = min(min(common_prefix(ids[0], r) for r in ids), min(len(r) for r in ids) - 1)
        computed = 0
        if len(ids) > 1 and shared >= self.min_prefix_tokens and any(n < shared for _, n in hits):
            entry = Entry(ids[0][:shared], prefill_kv(self.model, ids[0][:shared].tolist()))
            self.store.add(entry.ids, entry.kv)
            hits = [(entry, shared) if n < shared else (e, n) for e, n in hits]
            computed = shared
        self.cached_prompt_tokens += sum(n for _, n in hits) - computed
        return hits

    def _prefill(self, group: list[Request], max_new_tokens: int) -> list[tuple[Batch, torch.Tensor]]:
        """Run the group's new tokens (those not in the store), in chunks of similar length."""
        ids = [r for _, r in group]
        hits = self._lookup(ids)
        self.prompt_tokens += sum(len(r) for r in ids)
        rows = sorted(zip(group, hits, strict=True), key=lambda gh: len(gh[0][1]) - gh[1][1])
        chunks = self._chunks([len(r) - n for (_, r), (_, n) in rows]) if self.buffers else [len(rows)]
        out, start = [], 0
        for end in chunks:
            part = rows[start:end]
            out.append(self._prefill_chunk([g for g, _ in part], [h for _, h in part], max_new_tokens))
            start = end
        return out

    @staticmethod
    def _chunks(lengths: list[int], overhead: int = 256) -> list[int]:
        """Chunk ends over ascending `lengths` minimising padded tokens (rows x longest per chunk)
        plus `overhead` tokens' worth per extra chunk (its own forward pass and merge)."""
        best, cut = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
        for j in range(1, len(lengths) + 1):
            best[j], cut[j] = min((best[i] + (j - i) * lengths[j - 1] + overhead, i) for i in range(j))
        ends, j = [], len(lengths)
        while j:
            ends.append(j)
            j = cut[j]
        return ends[::-1]

    def _prefill_chunk(self, group: list[Request], hits: list[tuple[Entry | None, int]],
                       max_new_tokens: int) -> tuple[Batch, torch.Tensor]:
        """Lay rows out as [pads | stored tokens | pads | new tokens] and run the new ones."""
        from transformers import DynamicCache

        ids = [r for _, r in group]
        cached = max(n for _, n in hits)
        width = cached + max(len(r) - n for r, (_, n) in zip(ids, hits, strict=True))
        x = torch.full((len(ids), width), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for j, (r, (_, n)) in enumerate(zip(ids, hits, strict=True)):
            x[j, cached - n:cached], mask[j, cached - n:cached] = torch.from_numpy(r[:n]), 1
            x[j, width - len(r) + n:], mask[j, width - len(r) + n:] = torch.from_numpy(r[n:]), 1
        device = self.model.device
        x, mask = x.to(device), mask.to(device)
        cache = (batch_cache(hits, cached, width + max_new_tokens, self.n_layers) if self.buffers
                 else DynamicCache(config=self.model.config))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # pads do not advance positions
        logits = self.model(input_ids=x[:, cached:], attention_mask=mask, position_ids=pos[:, cached:], cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        return Batch([Row(k, r) for k, r in group], cache, mask), logits

    def _step(self, b: Batch) -> torch.Tensor:
        mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        pos = b.mask.sum(-1, keepdim=True)  # each row's next position: its count of real tokens
        logits = self.model(input_ids=b.nxt[:, None], attention_mask=mask, position_ids=pos, cache=b.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        b.mask = mask
        return logits

    def _advance(self, b: Batch, logits: torch.Tensor, stop: list[str], max_new_tokens: int,
                 temperature: float) -> list[Row]:
        """Sample each row's next token; rows that end (EOS, stop string, length) leave the
        batch, their keys/values going to the store for their next turn."""
        logits = logits.float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
        else:
            nxt = logits.argmax(-1)
        ended = []
        for j, t in enumerate(nxt.tolist()):
            row = b.rows[j]
            if row.done:
                continue
            if t not in self.eos:
                row.new.append(t)
                if len(row.new) < max_new_tokens and not (stop and any(
                        s in self.tok.decode(row.new[-16:]) for s in stop)):
                    continue
            row.done = True
            ended.append(row)
            if self.store is not None:
                cols = b.mask[j].nonzero()[:, 0]
                seq = np.concatenate([row.ids, np.asarray(row.new, dtype=np.int64)])[:len(cols)]
                self.store.add(seq, row_kv(b.cache, j, cols))
        b.nxt = nxt
        b.compact()
        return ended

    def _merge(self, a: Batch, b: Batch, max_new_tokens: int) -> Batch:
        """One batch of a's and b's live rows: the narrower is left-padded to the wider's width."""
        for part in (a, b):
            part.compact(force=True)  # ended rows are not copied
        width = max(a.mask.shape[1], b.mask.shape[1])
        for li, layer in enumerate(a.cache.layers):
            merged = BufferLayer(width + max_new_tokens)
            merged.allocate(len(a.rows) + len(b.rows), layer.kb.shape[1], layer.kb.shape[-1], layer.kb.dtype,
                            layer.kb.device)
            merged.place(0, layer.keys, layer.values, width)
            merged.place(len(a.rows), b.cache.layers[li].keys, b.cache.layers[li].values, width)
            merged.set_length(width)
            a.cache.layers[li] = merged
        masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (a.mask, b.mask)]
        return Batch(a.rows + b.rows, a.cache, torch.cat(masks), torch.cat([a.nxt, b.nxt]))
