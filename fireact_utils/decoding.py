"""Continuous batching for agent rollouts on a local transformers model.

Turn-by-turn batching (every episode generates, then every episode acts) waits each turn for
its slowest row: one episode rambling to `max_new_tokens` holds the 31 that stopped after 20
tokens. Here a row leaves the batch the moment it ends; its episode acts (the tool call) and
its next prompt joins the running batch. Joining is cheap because keys/values of everything an
episode has seen come from the `PrefixStore` (see `kvcache`): only the new observation is
prefilled. New rows are prefilled as a group and merged into the running batch once at least
as many join as run, so the cache copy a merge costs stays small. The prefix all of a run's
first prompts share (the few-shot exemplars) is kept once for all rows (`prefix_attention`).

`Decoder.run` is the loop; `LocalBackend.generate` is `run` with no follow-up prompts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from .kvcache import (
    KV,
    PREFIX_ATTENTION,
    BufferLayer,
    Entry,
    PrefixStore,
    batch_cache,
    common_prefix,
    kv_tokens,
    prefill_kv,
    prefix_attention_on,
    row_kv,
    supports_buffers,
)
from .stops import Stop, cut_at_stop, stop_index

Request = tuple[object, np.ndarray]  # (caller's key, prompt token ids)


@dataclass
class Row:
    key: object
    ids: np.ndarray  # the prompt
    start: int = 0  # leading prompt tokens held by the run's shared prefix (0: not using it)
    new: list[int] = field(default_factory=list)  # generated so far
    done: bool = False  # ended, but still in the batch until the next compaction
    entry: Entry | None = None  # its keys/values once ended, for the store


@dataclass
class Batch:
    """Rows being decoded. `mask` covers the cache's columns (0 = pad), which hold each row's
    tokens after its `start`; `nxt` holds each row's latest token, sampled but not yet fed."""

    rows: list[Row]
    cache: object
    mask: torch.Tensor
    starts: torch.Tensor
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
            self.mask, self.starts, self.nxt = self.mask[sel], self.starts[sel], self.nxt[sel]
            self.rows = [self.rows[j] for j in keep]


class Decoder:
    def __init__(self, model, tokenizer, batch_size: int, store: PrefixStore | None, min_prefix_tokens: int = 32):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        # Preallocated buffers (and so merging and the store) only for plain full-attention models.
        self.buffers = supports_buffers(model.config)
        self.store = store if self.buffers else None
        self.min_prefix_tokens = min_prefix_tokens  # a shorter common prefix is not worth a batch-1 prefill
        self.prefix: Entry | None = None  # the current run's shared prefix
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id} - {None}
        # Prompt tokens seen, and those a row did not prefill itself (stored, or a shared prefix run once).
        self.prompt_tokens = self.cached_prompt_tokens = 0

    @property
    def share(self) -> bool:
        """Keep one copy of the rows' shared prefix? Merging its attention needs the CPU flash
        kernel's log-sum-exp, stored entries to start from, and a model on SDPA attention."""
        return (self.store is not None and self.model.device.type == "cpu"
                and self.model.config._attn_implementation in ("sdpa", PREFIX_ATTENTION))

    def run(self, requests: list[Request], stop: list[Stop], max_new_tokens: int, temperature: float,
            on_done: Callable[[object, str, int, int], list[Request]]) -> None:
        """Generate for every request; `on_done(key, text, prompt_tokens, completion_tokens)` is
        called as each ends and returns follow-up requests (an episode's next turn), served first."""
        pending = deque(sorted(requests, key=lambda r: len(r[1])))  # similar lengths pad less
        self.prefix = self._shared_prefix([r for _, r in requests])
        batch: Batch | None = None
        # The model's attention goes through `prefix_attention` only while this run decodes.
        with prefix_attention_on(self.model) if self.share else nullcontext(), torch.inference_mode():
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
                    follow = on_done(row.key, text, len(row.ids), len(row.new))
                    if row.entry is not None:  # without a follow-up, the first to go
                        self.store.add(row.entry, finished=not follow)
                        row.entry = None
                    pending.extendleft(reversed(follow))

    def _shared_prefix(self, ids: list[np.ndarray]) -> Entry | None:
        """The leading tokens all of `ids` share (the few-shot exemplars), computed once into the
        store unless it holds them. With `share` they are the run's prefix, held once for all
        rows; otherwise each row copies their keys/values from the store."""
        if self.store is None or len(ids) < 2:
            return None
        n = min(min(common_prefix(ids[0], r) for r in ids), min(len(r) for r in ids) - 1)
        if n < self.min_prefix_tokens:
            return None
        entry, covered = self.store.longest(ids[0][:n + 1])
        if entry is None or covered < n:
            entry = Entry(ids[0][:n], prefill_kv(self.model, ids[0][:n].tolist()))
            self.store.add(entry)
            self.cached_prompt_tokens -= n  # counted below as cached for every row, but run once here
        return Entry(ids[0][:n], entry.span(0, n)) if self.share else None

    def _start(self, ids: np.ndarray) -> int:
        p = self.prefix
        return len(p.ids) if p is not None and len(ids) > len(p.ids) and common_prefix(ids, p.ids) == len(p.ids) else 0

    def _stored(self, row: Row) -> KV | None:
        """Keys/values of the row's tokens after its `start` that the store holds."""
        if self.store is None:
            return None
        entry, n = self.store.longest(row.ids, max_start=row.start)
        return entry.span(row.start, n) if entry is not None and n > row.start else None

    def _prefill(self, group: list[Request], max_new_tokens: int) -> list[tuple[Batch, torch.Tensor]]:
        """Run the group's new tokens (those neither shared nor stored), in chunks of similar length."""
        rows = [Row(k, r, self._start(r)) for k, r in group]
        stored = [self._stored(r) for r in rows]
        lens = [kv_tokens(kv) for kv in stored]
        self.prompt_tokens += sum(len(r.ids) for r in rows)
        self.cached_prompt_tokens += sum(r.start + n for r, n in zip(rows, lens, strict=True))
        new = [len(r.ids) - r.start - n for r, n in zip(rows, lens, strict=True)]  # tokens to prefill
        order = sorted(range(len(rows)), key=new.__getitem__)
        chunks = self._chunks([new[j] for j in order]) if self.buffers else [len(rows)]
        out, start = [], 0
        for end in chunks:
            part = order[start:end]
            out.append(self._prefill_chunk([rows[j] for j in part], [stored[j] for j in part], max_new_tokens))
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

    def _prefill_chunk(self, rows: list[Row], stored: list[KV | None],
                       max_new_tokens: int) -> tuple[Batch, torch.Tensor]:
        """Lay rows out as [pads | stored tokens | pads | new tokens] and run the new ones."""
        from transformers import DynamicCache

        own = [r.ids[r.start:] for r in rows]
        lens = [kv_tokens(kv) for kv in stored]
        cached = max(lens)
        width = cached + max(len(o) - n for o, n in zip(own, lens, strict=True))
        x = torch.full((len(rows), width), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (o, n) in enumerate(zip(own, lens, strict=True)):
            x[j, cached - n:cached], mask[j, cached - n:cached] = torch.from_numpy(o[:n]), 1
            x[j, width - len(o) + n:], mask[j, width - len(o) + n:] = torch.from_numpy(o[n:]), 1
        device = self.model.device
        x, mask = x.to(device), mask.to(device)
        starts = torch.tensor([r.start for r in rows], device=device)
        cache = (batch_cache(stored, cached, width + max_new_tokens, self.n_layers) if self.buffers
                 else DynamicCache(config=self.model.config))
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + starts[:, None]  # pads do not advance positions
        batch = Batch(rows, cache, mask, starts)
        return batch, self._forward(batch, x[:, cached:], pos[:, cached:], mask)

    def _step(self, b: Batch) -> torch.Tensor:
        mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        pos = b.starts[:, None] + b.mask.sum(-1, keepdim=True)  # each row's next position
        logits = self._forward(b, b.nxt[:, None], pos, mask)
        b.mask = mask
        return logits

    def _forward(self, b: Batch, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits of `x` fed to the batch's cache (and the shared prefix)."""
        shared = {} if self.prefix is None else {"prefix": self.prefix.kv, "prefix_rows": b.starts > 0}
        return self.model(input_ids=x, attention_mask=mask, position_ids=pos, cache=b.cache, use_cache=True,
                          logits_to_keep=1, **shared).logits[:, -1]

    def _advance(self, b: Batch, logits: torch.Tensor, stop: list[Stop], max_new_tokens: int,
                 temperature: float) -> list[Row]:
        """Sample each row's next token; rows that end (EOS, stop string, length) leave the
        batch, their keys/values kept for the store (`run` adds them)."""
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
                if len(row.new) < max_new_tokens and not (stop and stop_index(self.tok.decode(row.new), stop) is not None):
                    continue
            row.done = True
            ended.append(row)
            if self.store is not None:
                cols = b.mask[j].nonzero()[:, 0]
                seq = np.concatenate([row.ids, np.asarray(row.new, dtype=np.int64)])[:row.start + len(cols)]
                row.entry = Entry(seq, row_kv(b.cache, j, cols), row.start)
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
        return Batch(a.rows + b.rows, a.cache, torch.cat(masks), torch.cat([a.starts, b.starts]),
                     torch.cat([a.nxt, b.nxt]))
