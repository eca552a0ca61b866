"""Harvesting from transformers models (hf.py) and text sources/packing (text.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BOS, TINY_PAD, make_tiny_gpt2
from torch import nn

from saekit.data.lm.harvester import TOKEN_IDS, Harvester, HookPoint, TokenFilter
from saekit.data.lm.text import (
    load_hf_documents,
    pack_tokens,
    read_documents,
    shard_documents,
    shuffle_documents,
    token_batches,
)

KEEP_ALL = TokenFilter(exclude_bos=False, exclude_padding=False)
D = 64


def flat(t):
    return t.reshape(-1, t.shape[-1])


def count_calls(monkeypatch, module):
    """Wrap ``module.forward`` and return a list whose length is the number of calls."""
    calls = []
    original = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", counted)
    return calls


# ---------------------------------------------------------------- hook points


def test_hook_point_parsing():
    assert HookPoint.parse("transformer.h.8") == HookPoint("transformer.h.8", "output")
    assert HookPoint.parse("transformer.h.8:input") == HookPoint("transformer.h.8", "input")
    assert str(HookPoint.parse("transformer.h.8:output")) == "transformer.h.8"
    with pytest.raises(ValueError, match="side must be"):
        HookPoint.parse("transformer.h.8:resid")


def test_block_hooks_equal_output_hidden_states(tiny_gpt2, token_ids):
    hidden = tiny_gpt2(token_ids, output_hidden_states=True).hidden_states  # 4 x [4, 16, 64]
    hooks = [f"transformer.h.{i}:input" for i in range(3)] + [
        f"transformer.h.{i}" for i in range(3)
    ]
    acts = Harvester(tiny_gpt2, hooks, token_filter=KEEP_ALL, early_stop=False)(token_ids)
    for i in range(3):
        # hidden_states[i] is the input of block i (resid_pre)
        assert torch.equal(acts[f"transformer.h.{i}:input"], flat(hidden[i]))
    for i in range(2):
        assert torch.equal(acts[f"transformer.h.{i}"], flat(hidden[i + 1]))
    # the last hidden state has ln_f applied: the raw block output differs, ln_f of it matches
    last = acts["transformer.h.2"]
    assert (last - flat(hidden[3])).abs().max() > 0.1
    torch.testing.assert_close(tiny_gpt2.transformer.ln_f(last), flat(hidden[3]))
    assert acts["transformer.h.0:input"].shape == (4 * 16, D)


def test_tuple_outputs_take_element_zero_and_sublayers_add_up(tiny_gpt2, token_ids):
    # GPT2Attention returns a tuple (attn_output, weights); the block is
    # resid_post = resid_pre + attn_out + mlp_out
    hooks = [
        "transformer.h.1:input",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
        "transformer.h.1",
    ]
    acts = Harvester(tiny_gpt2, hooks, token_filter=KEEP_ALL)(token_ids)
    total = (
        acts["transformer.h.1:input"] + acts["transformer.h.1.attn"] + acts["transformer.h.1.mlp"]
    )
    torch.testing.assert_close(total, acts["transformer.h.1"], atol=1e-5, rtol=1e-5)
    assert acts["transformer.h.1.mlp"].abs().mean() > 1e-3  # not vacuous


def test_early_stop_never_runs_later_layers(tiny_gpt2, token_ids, monkeypatch):
    later = [tiny_gpt2.transformer.h[1], tiny_gpt2.transformer.h[2], tiny_gpt2.transformer.ln_f]
    counters = [count_calls(monkeypatch, m) for m in later + [tiny_gpt2.lm_head]]
    first = count_calls(monkeypatch, tiny_gpt2.transformer.h[0])
    stopped = Harvester(tiny_gpt2, "transformer.h.0", token_filter=KEEP_ALL)(token_ids)
    assert len(first) == 1
    assert [len(c) for c in counters] == [0, 0, 0, 0]
    full = Harvester(tiny_gpt2, "transformer.h.0", token_filter=KEEP_ALL, early_stop=False)(
        token_ids
    )
    assert [len(c) for c in counters] == [1, 1, 1, 1]
    assert torch.equal(stopped["transformer.h.0"], full["transformer.h.0"])


def test_several_hooks_come_from_one_forward_pass(tiny_gpt2, token_ids, monkeypatch):
    block0 = count_calls(monkeypatch, tiny_gpt2.transformer.h[0])
    block2 = count_calls(monkeypatch, tiny_gpt2.transformer.h[2])
    hooks = ["transformer.h.0:input", "transformer.h.1.mlp", "transformer.h.1"]
    acts = Harvester(tiny_gpt2, hooks, token_filter=KEEP_ALL)(token_ids)
    assert (len(block0), len(block2)) == (1, 0)  # one pass, stopped after block 1
    assert list(acts) == hooks
    single = Harvester(tiny_gpt2, "transformer.h.1.mlp", token_filter=KEEP_ALL)(token_ids)
    assert torch.equal(acts["transformer.h.1.mlp"], single["transformer.h.1.mlp"])


def test_padding_bos_and_special_exclusion_count_tokens(tiny_gpt2, token_ids):
    ids = token_ids.clone()
    mask = torch.ones_like(ids)
    ids[:, 0] = TINY_BOS  # 4 BOS at the start
    ids[1, 7] = TINY_BOS  # one document separator inside a row
    mask[2, 10:] = 0  # right padding: 6 positions
    ids[2, 10:] = TINY_PAD
    mask[3, :3] = 0  # left padding: 3 positions, BOS moves to position 3
    ids[3, :3] = TINY_PAD
    ids[3, 3] = TINY_BOS
    ids[0, 5] = 299  # a "special" token
    filt = TokenFilter(bos_token_id=TINY_BOS, special_token_ids=frozenset({299, TINY_BOS}))

    hook = "transformer.h.1"
    everything = Harvester(tiny_gpt2, hook, token_filter=KEEP_ALL)(ids, mask)[hook]
    assert everything.shape == (64, D)
    no_pad = Harvester(tiny_gpt2, hook, token_filter=TokenFilter(exclude_bos=False))(ids, mask)
    assert no_pad[hook].shape == (64 - 9, D)
    harvested = Harvester(tiny_gpt2, hook, token_filter=filt, return_tokens=True)(ids, mask)
    # 64 - 9 padding - 3 BOS at position 0 (row 3's position 0 is padding) - row 3's BOS
    # - the separator in row 1 = 50
    assert harvested[hook].shape == (50, D)
    assert (harvested[TOKEN_IDS] != TINY_BOS).all()
    assert 299 in harvested[TOKEN_IDS].tolist()
    special = TokenFilter(
        bos_token_id=TINY_BOS, special_token_ids=filt.special_token_ids, exclude_special=True
    )
    assert Harvester(tiny_gpt2, hook, token_filter=special)(ids, mask)[hook].shape == (49, D)
    # the kept rows are exactly the unfiltered rows at the kept positions, in order
    keep = (mask.bool() & (ids != TINY_BOS)).reshape(-1)
    assert torch.equal(harvested[hook], everything[keep])
    assert torch.equal(harvested[TOKEN_IDS], ids.reshape(-1)[keep])


def test_token_filter_from_tokenizer(tiny_tokenizer):
    filt = TokenFilter.from_tokenizer(tiny_tokenizer, exclude_special=True)
    assert filt.bos_token_id == 1
    assert filt.special_token_ids == frozenset({0, 1, 2})
    ids = torch.tensor([[1, 5, 2, 7, 0]])
    assert filt.mask(ids).tolist() == [[False, True, False, True, False]]


def test_dtype_device_and_stream(tiny_gpt2, token_ids):
    hook = "transformer.h.0"
    harvester = Harvester(
        tiny_gpt2, hook, dtype=torch.bfloat16, device="cpu", token_filter=KEEP_ALL
    )
    direct = harvester(token_ids)[hook]
    assert direct.dtype == torch.bfloat16
    batches = [
        token_ids[:2],
        (token_ids[2:], torch.ones_like(token_ids[2:])),
        {"input_ids": token_ids},
    ]
    plain = [b[hook] for b in harvester.stream(batches)]
    ahead = [b[hook] for b in harvester.stream(batches, prefetch=2)]
    assert [len(p) for p in plain] == [32, 32, 64]
    for a, b in zip(plain, ahead, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.cat(plain[:2]), direct)


def test_unknown_module_lists_close_matches(tiny_gpt2):
    with pytest.raises(
        ValueError, match=r"unknown module 'transformer\.h\.1\.mpl'.*transformer\.h\.1\.mlp"
    ):
        Harvester(tiny_gpt2, "transformer.h.1.mpl")


class TwoPaths(nn.Module):
    """A toy model with a module that its forward never calls."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None, **_):
        return self.used(self.embed(input_ids))


def test_hook_that_never_fires_is_an_error():
    model = TwoPaths()
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert Harvester(model, "used")(ids)["used"].shape == (6, 4)
    with pytest.raises(RuntimeError, match="never fired.*unused"):
        Harvester(model, ["used", "unused"])(ids)


def test_harvested_activations_can_train_with_autograd(tiny_gpt2, token_ids):
    # harvesting must not hand out inference-mode tensors (they break SAE backward)
    acts = Harvester(tiny_gpt2, "transformer.h.0", token_filter=KEEP_ALL)(token_ids)
    layer = nn.Linear(D, 3)
    layer(acts["transformer.h.0"]).sum().backward()
    assert layer.weight.grad is not None


def test_load_model_from_local_directory(tmp_path):
    from saekit.data.lm.harvester import load_model

    make_tiny_gpt2(seed=3).save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), local_files_only=True)
    assert not model.training
    ref = make_tiny_gpt2(seed=3)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


# ---------------------------------------------------------------- text


def test_pack_tokens_with_separators_and_bos():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    assert list(pack_tokens(docs, 4, separator_id=1, bos_id=2)) == [
        [2, 10, 11, 12],
        [2, 1, 20, 21],
        [2, 1, 30, 31],
        [2, 32, 33, 34],
    ]  # the trailing separator is the dropped incomplete tail
    assert list(pack_tokens(docs, 5)) == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 34]]


def test_sharding_splits_documents_disjointly():
    docs = [f"doc{i}" for i in range(11)]
    shards = [list(shard_documents(docs, r, 3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(sum(shards, [])) == sorted(docs)
    with pytest.raises(ValueError):
        list(shard_documents(docs, 3, 3))


def test_shuffle_is_a_seeded_permutation():
    docs = list(range(100))
    a = list(shuffle_documents(docs, seed=5, buffer_size=16))
    assert sorted(a) == docs and a != docs
    assert a == list(shuffle_documents(docs, seed=5, buffer_size=16))
    assert a != list(shuffle_documents(docs, seed=6, buffer_size=16))


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2\n\nw3 w4 w5\n\n\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for words in ["w1", "w2 w3"]:
            f.write(json.dumps({"body": words, "id": 0}) + "\n")
    assert list(read_documents(tmp_path / "a.txt")) == ["w1 w2", "w3 w4 w5"]
    assert list(read_documents(tmp_path / "b.jsonl", field="body")) == ["w1", "w2 w3"]
    with pytest.raises(KeyError, match="b.jsonl:1.*'text'"):
        list(read_documents(tmp_path / "b.jsonl"))


def test_token_batches_from_in_memory_dataset_are_sharded_and_deterministic(tiny_tokenizer):
    import datasets

    texts = [" ".join(f"w{(3 * i + j) % 50}" for j in range(i % 7 + 1)) for i in range(40)]
    ds = datasets.Dataset.from_dict({"text": texts})

    def batches(rank, world, seed):
        docs = load_hf_documents(ds, seed=seed, rank=rank, world_size=world)
        return list(token_batches(docs, tiny_tokenizer, context_length=8, batch_size=3))

    whole = torch.cat(batches(0, 1, seed=None))
    n_tokens = sum(len(t.split()) + 1 for t in texts)  # words + one separator per document
    assert whole.shape == (n_tokens // 7, 8)  # 7 tokens after each BOS
    assert (whole[:, 0] == 1).all()
    # ranks see disjoint documents that together cover the set
    per_rank = [list(load_hf_documents(ds, seed=4, rank=r, world_size=2)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(texts)
    assert len(set(texts)) == 40 and not set(per_rank[0]) & set(per_rank[1])
    for r in range(2):
        a, b = batches(r, 2, seed=4), batches(r, 2, seed=4)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(batches(0, 2, 4)), torch.cat(batches(0, 2, 5)))
