"""KV reuse for batched agent rollouts on a local model.

An agent's prompts repeat themselves: every few-shot episode starts with the same exemplars,
and each turn's prompt is the previous turn's prompt + generation + observation. On a CPU,
recomputing those tokens (prefill) every turn costs more than generating. `PrefixStore` keeps
the keys/values of token sequences already computed; `batch_cache` lays a batch out as

    [pads | row r's tokens found in the store | pads | row r's new tokens]

with the first block already in the cache, so each row only prefills its new tokens. Position
ids come from the attention mask (cumsum), so pads anywhere in a row are invisible to it.

`BufferLayer` preallocates room for the tokens to come: appending a token writes in place
instead of copying the whole cache as `DynamicLayer`'s `torch.cat` does (1.5x per decode step
at batch 32 and 600 tokens of context on this CPU).

The prefix every row shares (the few-shot exemplars, most of a prompt) is kept once, not per
row: `prefix_attention` attends to it with all rows' queries in one call, attends to each row's
own tokens as usual, and merges the two by their log-sum-exp. A decode step's attention then
reads the exemplars' keys/values once instead of once per row (half of a step at batch 32 on
this CPU), and rows join, leave and get stored without copying them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each [heads, tokens, head_dim]


def supports_buffers(config) -> bool:
    """Only plain full-attention decoders: sliding-window or linear-attention layers keep other state."""
    cfg = config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types) and not getattr(cfg, "sliding_window", None)


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views into buffers of `capacity` tokens."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def allocate(self, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        """Uninitialised buffers: attention reads only the first `length` columns, which callers
        fill (or zero, for pads) before they are read."""
        self.kb = torch.empty(batch, heads, self.capacity, head_dim, dtype=dtype, device=device)
        self.vb = torch.empty_like(self.kb)
        self.device, self.is_initialized = device, True
        self.set_length(0)

    def set_length(self, n: int) -> None:
        self.keys, self.values = self.kb[:, :, :n], self.vb[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self.allocate(b, h, d, key_states.dtype, key_states.device)
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self.capacity:
            raise RuntimeError(f"KV buffer full: {n} + {m} tokens > capacity {self.capacity}")
        self.kb[:, :, n:n + m] = key_states
        self.vb[:, :, n:n + m] = value_states
        self.set_length(n + m)
        return self.keys, self.values

    def place(self, row: int, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        """Write `keys`/`values` ([rows, heads, n, head_dim]) into rows from `row` on, ending at
        column `end`, zeroing the columns before them (pads: masked, but they must be finite)."""
        rows, n = keys.shape[0], keys.shape[-2]
        self.kb[row:row + rows, :, :end - n], self.vb[row:row + rows, :, :end - n] = 0, 0
        self.kb[row:row + rows, :, end - n:end], self.vb[row:row + rows, :, end - n:end] = keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.keys.shape[-2]
        kb, vb = self.kb, self.vb
        self.allocate(len(indices), kb.shape[1], kb.shape[-1], kb.dtype, kb.device)
        self.kb[:, :, :n], self.vb[:, :, :n] = kb[indices, :, :n], vb[indices, :, :n]
        self.set_length(n)


@dataclass
class Entry:
    ids: np.ndarray  # a token sequence
    kv: KV  # keys/values of ids[start:] (those before are a shared prefix, kept elsewhere)
    start: int = 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)

    def span(self, lo: int, hi: int) -> KV:
        """Keys/values (views) of ids[lo:hi]; lo must not be before `start`."""
        a, b = lo - self.start, hi - self.start
        return [(k[:, a:b], v[:, a:b]) for k, v in self.kv]


def kv_tokens(kv: KV | None) -> int:
    return 0 if kv is None else kv[0][0].shape[1]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class PrefixStore:
    """Token sequences → their keys/values, least recently used first out past `max_bytes`.

    An entry that a newly added one extends is dropped: the new one serves every prompt the old
    one did (an episode's last turn supersedes its earlier ones). An entry added as `finished`
    (an episode's last turn) goes first: after a 100-episode evaluation they would fill the
    budget, while only the running episodes' entries are still to be extended."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.nbytes = 0

    def longest(self, ids: np.ndarray, max_start: int = 0) -> tuple[Entry | None, int]:
        """The entry (with `start` ≤ max_start) sharing the most leading tokens with `ids`, and
        how many (at most len - 1: the model must see one new token to produce the next)."""
        best, best_key, n = None, -1, 0
        for key, e in self.entries.items():
            k = min(common_prefix(e.ids, ids), len(ids) - 1)
            if e.start <= max_start and k > max(n, e.start):
                best, n, best_key = e, k, key
        if best is not None:
            self.entries.move_to_end(best_key)
        return best, n

    def add(self, entry: Entry, finished: bool = False) -> None:
        for key, e in list(self.entries.items()):
            shared = common_prefix(e.ids, entry.ids)
            if shared == len(e.ids) and entry.start <= e.start:  # e is a prefix of entry: superseded
                self.nbytes -= e.nbytes
                del self.entries[key]
            elif shared == len(entry.ids) and e.start <= entry.start:
                return  # already covered by a longer entry
        self.entries[self._next] = entry
        if finished:
            self.entries.move_to_end(self._next, last=False)
        self._next += 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def prefill_kv(model, ids: list[int]) -> KV:
    """Keys/values of `ids` computed alone (batch 1, no padding)."""
    with torch.inference_mode():
        cache = model(torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1).cache
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def batch_cache(stored: list[KV | None], width: int, capacity: int, n_layers: int) -> DynamicCache:
    """A cache of `width` columns whose row r ends with `stored[r]` (right-aligned, pads before)."""
    cache = DynamicCache()
    cache.layers = [BufferLayer(capacity) for _ in range(n_layers)]
    first = next((kv for kv in stored if kv is not None), None)
    if first is None:
        return cache  # nothing stored: buffers are allocated at the first update
    for li, layer in enumerate(cache.layers):
        k0 = first[li][0]
        layer.allocate(len(stored), k0.shape[0], k0.shape[-1], k0.dtype, k0.device)
        for r, kv in enumerate(stored):
            k, v = kv[li] if kv is not None else (k0[:, :0], k0[:, :0])
            layer.place(r, k[None], v[None], width)
        layer.set_length(width)
    return cache


def row_kv(cache: DynamicCache, row: int, cols: torch.Tensor) -> KV:
    """Row `row`'s keys/values at the (non-pad) columns `cols`, copied out of the batch."""
    return [(layer.keys[row][:, cols], layer.values[row][:, cols]) for layer in cache.layers]


# Shared-prefix attention -------------------------------------------------------------------------

PREFIX_ATTENTION = "fireact_prefix"


def prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     prefix: KV | None = None, prefix_rows: torch.Tensor | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA over `prefix[layer]` (the keys/values every row in `prefix_rows` has before its own
    tokens) + over the row's own cached tokens (`key`/`value`).

    Without `prefix` this is transformers' SDPA attention, unchanged. With it, CPU only: the
    flash kernel returns the log-sum-exp that merging the two parts needs."""
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, heads, q, d = query.shape
    groups = key.shape[1]  # key/value heads
    rep = heads // groups  # query heads per key/value head
    # The heads of a group side by side along the query axis: no repeated keys/values (GQA).
    qg = query.reshape(b, groups, rep * q, d)
    if attention_mask is None and q > 1:  # transformers skips the mask when it is purely causal
        attention_mask = torch.ones(q, key.shape[2], dtype=torch.bool, device=query.device).tril(key.shape[2] - q)
    mask = None
    if attention_mask is not None:  # additive float mask, one row per packed query
        mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(~attention_mask, float("-inf")).expand(b, 1, q, -1).repeat(1, 1, rep, 1)
    own, own_lse = flash(qg, key, value, attn_mask=mask, scale=scaling)
    pk, pv = prefix[module.layer_idx]
    # Every row's queries against the one shared prefix: its keys/values are read once.
    shared, shared_lse = flash(qg.transpose(0, 1).reshape(1, groups, b * rep * q, d), pk[None], pv[None],
                               scale=scaling)
    shared = shared.view(groups, b, rep * q, d).transpose(0, 1)
    shared_lse = shared_lse.view(groups, b, rep * q).transpose(0, 1)
    if prefix_rows is not None:  # rows that do not start with the prefix give it no weight
        shared_lse = shared_lse.masked_fill(~prefix_rows[:, None, None], float("-inf"))
    w = torch.sigmoid(own_lse - shared_lse)[..., None].to(own.dtype)  # softmax weight of the row's own tokens
    out = shared + w * (own - shared)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


@contextmanager
def prefix_attention_on(model) -> Iterator[None]:
    """Route `model`'s attention through `prefix_attention` (plain SDPA unless a call passes
    `prefix=`, with SDPA's boolean masks) while the block runs; the model's own comes back after."""
    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(PREFIX_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
