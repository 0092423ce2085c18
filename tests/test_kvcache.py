"""PrefixStore bookkeeping on real tensors: longest match, superseded entries, byte budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fireact_utils.kvcache import BufferLayer, Entry, PrefixStore, common_prefix


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(3, n, 4), torch.randn(3, n, 4)) for _ in range(layers)]


def _ids(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


def test_common_prefix():
    assert common_prefix(_ids(1, 2, 3), _ids(1, 2, 4)) == 2
    assert common_prefix(_ids(1, 2), _ids(1, 2, 3)) == 2
    assert common_prefix(_ids(5), _ids(1)) == 0


def test_longest_match_leaves_one_token_to_prefill():
    store = PrefixStore(max_bytes=10**9)
    store.add(Entry(_ids(1, 2, 3, 4), _kv(4)))
    store.add(Entry(_ids(9, 9), _kv(2)))
    entry, n = store.longest(_ids(1, 2, 3, 4))
    assert n == 3 and list(entry.ids) == [1, 2, 3, 4]  # the whole prompt would leave nothing to run
    assert store.longest(_ids(1, 2, 7, 8, 9))[1] == 2
    assert store.longest(_ids(5, 6)) == (None, 0)


def test_entry_superseded_by_its_extension():
    store = PrefixStore(max_bytes=10**9)
    store.add(Entry(_ids(1, 2, 3), _kv(3)))
    store.add(Entry(_ids(1, 2, 3, 4, 5), _kv(5)))  # the next turn of the same episode
    assert [list(e.ids) for e in store.entries.values()] == [[1, 2, 3, 4, 5]]
    store.add(Entry(_ids(1, 2), _kv(2)))  # covered by the longer entry: not stored
    assert len(store.entries) == 1
    assert store.nbytes == sum(e.nbytes for e in store.entries.values())


def test_entries_after_a_shared_prefix():
    """An entry holding only the tokens after a shared prefix (start > 0) serves rows that use that
    prefix, never rows that need the prefix's keys/values from the entry; and it does not push
    out the prefix's own entry, which it extends."""
    store = PrefixStore(max_bytes=10**9)
    store.add(Entry(_ids(1, 2, 3), _kv(3)))  # the shared prefix, from token 0
    store.add(Entry(_ids(1, 2, 3, 4, 5, 6), _kv(3), start=3))  # a row's own tokens after it
    assert len(store.entries) == 2
    entry, n = store.longest(_ids(1, 2, 3, 4, 5, 6, 7), max_start=3)
    assert n == 6 and entry.start == 3
    entry, n = store.longest(_ids(1, 2, 3, 4, 5, 6, 7))  # a row without the shared prefix
    assert n == 3 and entry.start == 0
    store.add(Entry(_ids(1, 2, 3, 4, 5, 6, 7, 8), _kv(5), start=3))  # the row's next turn
    assert sorted(e.start for e in store.entries.values()) == [0, 3] and len(store.entries) == 2


def test_byte_budget_evicts_least_recently_used():
    one = sum(k.nbytes + v.nbytes for k, v in _kv(10))
    store = PrefixStore(max_bytes=2 * one)
    store.add(Entry(_ids(*range(0, 10)), _kv(10)))
    store.add(Entry(_ids(*range(100, 110)), _kv(10)))
    store.longest(_ids(*range(0, 10)))  # touch the first: the second is now the oldest
    store.add(Entry(_ids(*range(200, 210)), _kv(10)))
    assert sorted(int(e.ids[0]) for e in store.entries.values()) == [0, 200]
    assert store.nbytes <= store.max_bytes


def test_finished_entries_are_evicted_first():
    """An episode's last turn goes before older entries that running episodes will extend."""
    one = sum(k.nbytes + v.nbytes for k, v in _kv(10))
    store = PrefixStore(max_bytes=2 * one)
    store.add(Entry(_ids(*range(0, 10)), _kv(10)))  # a running episode, the oldest entry
    store.add(Entry(_ids(*range(100, 110)), _kv(10)), finished=True)
    store.add(Entry(_ids(*range(200, 210)), _kv(10)))
    assert sorted(int(e.ids[0]) for e in store.entries.values()) == [0, 200]
    store.add(Entry(_ids(*range(300, 310)), _kv(10)), finished=True)  # over budget: goes at once
    assert sorted(int(e.ids[0]) for e in store.entries.values()) == [0, 200]


def test_buffer_layer_appends_in_place_and_selects_rows():
    layer = BufferLayer(capacity=5)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    keys, _ = layer.update(k, v)
    buf = layer.kb
    keys, values = layer.update(k[:, :, :1] + 1, v[:, :, :1] + 1)
    assert layer.kb is buf and keys.shape == (2, 3, 3, 4)  # no reallocation
    assert torch.equal(keys[:, :, :2], k) and torch.equal(values[:, :, 2:], v[:, :, :1] + 1)
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys[0, :, :2], k[1]) and layer.get_seq_length() == 3
    with pytest.raises(RuntimeError, match="capacity"):  # overflowing the buffer must raise
        layer.update(torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_prefix_attention_equals_attention_over_the_concatenation(dtype, atol):
    """Grouped-query heads, causal queries over a row's own tokens, one row not using the
    prefix: equal to plain SDPA over [prefix | own tokens] with the keys/values repeated."""
    import types

    import torch.nn.functional as F

    from fireact_utils.kvcache import prefix_attention

    torch.manual_seed(0)
    b, heads, groups, q, d, p, n = 2, 9, 3, 4, 16, 10, 6
    query = torch.randn(b, heads, q, d, dtype=dtype)
    keys, values = torch.randn(b, groups, n, d, dtype=dtype), torch.randn(b, groups, n, d, dtype=dtype)
    pk, pv = torch.randn(groups, p, d, dtype=dtype), torch.randn(groups, p, d, dtype=dtype)
    causal = torch.ones(b, 1, q, n, dtype=torch.bool).tril(n - q)
    out, _ = prefix_attention(types.SimpleNamespace(layer_idx=0), query, keys, values, causal,
                              prefix=[(pk, pv)], prefix_rows=torch.tensor([True, False]))
    assert out.dtype == dtype and out.shape == (b, q, heads, d)
    full_k = torch.cat([pk.expand(b, -1, -1, -1), keys], 2).repeat_interleave(heads // groups, 1)
    full_v = torch.cat([pv.expand(b, -1, -1, -1), values], 2).repeat_interleave(heads // groups, 1)
    mask = torch.cat([torch.ones(b, 1, q, p, dtype=torch.bool), causal], -1)
    mask[1, :, :, :p] = False  # row 1 does not start with the prefix
    ref = F.scaled_dot_product_attention(query.float(), full_k.float(), full_v.float(), attn_mask=mask)
    assert torch.allclose(out.float(), ref.transpose(1, 2), atol=atol)


def test_prefix_attention_matches_full_attention(local_llm):
    """The real model's logits with the shared prefix attended separately equal those of one full
    forward pass, for a left-padded row using the prefix and for a row that does not use it."""
    from fireact_utils.kvcache import prefill_kv, prefix_attention_on

    model, tok = local_llm.model, local_llm.tok
    ids = tok("Question: Which magazine was started first, Arthur's Magazine or First for Women?\n"
              "Thought: I need to search Arthur's Magazine.\nAction: search[Arthur's Magazine]")["input_ids"]
    other = tok("The capital of France is")["input_ids"]
    n = 20  # the shared prefix
    own_attention = model.config._attn_implementation
    with prefix_attention_on(model), torch.inference_mode():
        full = [model(torch.tensor([x])).logits[0, -1] for x in (ids, other)]
        prefix = prefill_kv(model, ids[:n])
        own = ids[n:]
        width = max(len(own), len(other))
        x, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
        for j, row in enumerate((own, other)):
            x[j, width - len(row):], mask[j, width - len(row):] = torch.tensor(row), 1
        starts = torch.tensor([n, 0])
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + starts[:, None]
        split = model(input_ids=x, attention_mask=mask, position_ids=pos, prefix=prefix,
                      prefix_rows=starts > 0).logits[:, -1]
    for got, want in zip(split, full, strict=True):
        assert torch.allclose(got, want, atol=1e-3) and got.argmax() == want.argmax()
    assert not torch.allclose(split[0], split[1])  # the two rows really differ
    assert model.config._attn_implementation == own_attention == "sdpa"  # the caller's model is left as it was
