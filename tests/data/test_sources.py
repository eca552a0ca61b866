"""Activation sources of real models: the cache source and the online (transformers) source."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import make_tiny_gpt2

from saekit.data.cache.writing import write_cache
from saekit.data.sources.cache import CacheSource
from saekit.model.sae import SAE
from saekit.train.config import build_run_config, make_source
from saekit.train.outputs import save_outputs
from saekit.train.trainer import Trainer

D = 8
HOOK = "transformer.h.1:input"


def take(stream, n):
    return list(itertools.islice(stream, n))


def write_text_cache(path, n_tokens=300, shard_tokens=64, seed=0):
    """Tokens whose first coordinate is their index: every row is identifiable."""
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = torch.arange(n_tokens, dtype=torch.float32)
    batches = list(x.split(37))
    write_cache(path, batches, "blocks.1", "toy", torch.float32, shard_tokens=shard_tokens)
    return x


def write_documents(path, n_docs=120, seed=0):
    rng = random.Random(seed)
    docs = (
        " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 30)))
        for _ in range(n_docs)
    )
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 and its tokenizer saved to a local directory (no network)."""
    path = tmp_path_factory.mktemp("lm") / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- cache


def test_cache_resume_at_batch_k_equals_the_fresh_stream_from_k(tmp_path):
    write_text_cache(tmp_path)
    source = CacheSource(tmp_path, batch_size=32, shuffle_buffer_tokens=96, seed=3)
    per_epoch = source.batches_per_epoch
    assert per_epoch == (300 - 44) // 32  # last shard (44 tokens) held out
    fresh = take(source.batches(), 3 * per_epoch)
    for k in (0, 5, per_epoch - 1, per_epoch, 2 * per_epoch + 2):
        resumed = take(CacheSource(tmp_path, 32, 96, seed=3).batches(start=k), 3)
        for got, expected in zip(resumed, fresh[k : k + 3], strict=True):
            assert torch.equal(got, expected)


def test_cache_epochs_cover_training_shards_in_new_orders_and_hold_out_the_last(tmp_path):
    write_text_cache(tmp_path)
    source = CacheSource(tmp_path, batch_size=32, shuffle_buffer_tokens=96, seed=0)
    n = source.batches_per_epoch
    stream = take(source.batches(), 2 * n)
    epochs = [torch.cat(stream[:n])[:, 0], torch.cat(stream[n:])[:, 0]]
    for ids in epochs:
        assert all(len(b) == 32 for b in stream)
        assert len(set(ids.tolist())) == len(ids) and ids.max() < 256  # no token of shard 4
    assert not torch.equal(epochs[0], epochs[1])  # the epoch is in the seed
    held_out = torch.cat([x for x, coefficients in source.eval_batches(1000, 16)])
    assert held_out[:, 0].tolist() == list(range(256, 300))


def test_cache_sample_for_init_and_other_seed(tmp_path):
    write_text_cache(tmp_path)
    source = CacheSource(tmp_path, 32, 96, seed=0, init_tokens=100)
    sample = source.sample_for_init()
    assert sample.shape == (100, D) and sample.dtype == torch.float32
    rows = sample[:, 0].long().tolist()  # training rows only (the last shard is held out)
    assert len(set(rows)) == 100 and max(rows) < 256
    again = CacheSource(tmp_path, 32, 96, seed=0, init_tokens=100).sample_for_init()
    assert torch.equal(sample, again)
    assert {r // 64 for r in rows} == {0, 1, 2, 3}  # every training shard, not the first only
    other = take(CacheSource(tmp_path, 32, 96, seed=1).batches(), 1)[0]
    assert not torch.equal(other, take(source.batches(), 1)[0])


def test_single_shard_cache_warns_and_evaluates_on_training_data(tmp_path):
    write_text_cache(tmp_path, n_tokens=100, shard_tokens=1000)
    source = CacheSource(tmp_path, 32, 0, seed=0)
    assert source.batches_per_epoch == 3
    with pytest.warns(UserWarning, match="single shard"):
        x = torch.cat([x for x, _ in source.eval_batches(50, 32)])
    assert x[:, 0].tolist() == list(range(50))


def test_cache_too_small_for_one_batch_is_a_clear_error(tmp_path):
    write_text_cache(tmp_path, n_tokens=100, shard_tokens=60)
    with pytest.raises(ValueError, match="60 training tokens.*batch_size = 64"):
        CacheSource(tmp_path, 64, 0, seed=0)


def test_cache_run_config_records_model_and_hook_and_checks_width(tmp_path):
    write_text_cache(tmp_path)
    raw = {
        "data": {"source": "cache", "cache_dir": str(tmp_path)},
        "saes": [{"sae": {"d_sae": 16, "activation": {"kind": "topk", "k": 2}}}],
    }
    cfg = build_run_config(raw)
    sae = cfg.saes[0].sae
    assert (sae.d_in, sae.model_name, sae.hook) == (D, "toy", "blocks.1")
    raw["saes"][0]["sae"]["d_in"] = 5
    with pytest.raises(ValueError, match="d_in = 5 .* width 8"):
        build_run_config(raw)


# ---------------------------------------------------------------- online


def hf_config(lm_dir, text_file, tmp_path, **data):
    raw = {
        "data": {
            "source": "hf",
            "model": str(lm_dir),
            "hook": HOOK,
            "text_file": str(text_file),
            "context_length": 16,
            "model_batch_size": 4,
            "local_files_only": True,
            "shuffle_buffer_tokens": 256,
            **data,
        },
        "saes": [{"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 4}}, "lr": 1e-3}],
        "batch_size": 64,
        "steps": 6,
        "eval_tokens": 128,
        "log_every": 3,
        "checkpoint_every": 0,
        "progress": False,
        "out_dir": str(tmp_path / "run"),
    }
    return build_run_config(raw)


def test_online_resume_at_batch_k_equals_the_fresh_stream_across_epochs(lm_dir, tmp_path):
    # 40 documents of at most 29 words: at most 18 batches of 64 per epoch, so k = 25 and the
    # batches after it come from a later epoch (reshuffled with the epoch in the seed)
    text = write_documents(tmp_path / "docs.txt", n_docs=40)
    cfg = hf_config(lm_dir, text, tmp_path, prefetch=2)
    fresh = take(make_source(cfg).batches(), 27)
    assert all(b.shape == (64, 64) and b.dtype == torch.float32 for b in fresh)
    for k in (0, 7, 25):
        resumed = take(make_source(cfg).batches(start=k), 2)
        for got, expected in zip(resumed, fresh[k : k + 2], strict=True):
            assert torch.equal(got, expected)


def test_online_source_holds_out_the_leading_documents(lm_dir, tmp_path):
    # Hook the token embeddings, so every activation row names its token. The first 9
    # documents (9 × 16 = eval_tokens + context_length tokens) use words w0..w9 (ids 3..12),
    # the others w10..w49: training must never see ids 3..12, evaluation nothing else.
    rng = random.Random(0)
    held = [" ".join(f"w{rng.randrange(10)}" for _ in range(16)) for _ in range(9)]
    rest = [" ".join(f"w{rng.randrange(10, 50)}" for _ in range(20)) for _ in range(40)]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(held + rest))
    cfg = hf_config(lm_dir, text, tmp_path, hook="transformer.wte", prefetch=0)
    source = make_source(cfg)
    assert source.n_eval_docs == 9
    embedding = source.model.get_input_embeddings().weight

    def token_ids(x):
        match = (x[:, None, :] == embedding[None]).all(-1)  # [N, vocab]
        assert (match.sum(-1) == 1).all()
        return match.float().argmax(-1)

    train_ids = token_ids(torch.cat(take(source.batches(), 12)))
    eval_x = torch.cat([x for x, _ in source.eval_batches(128, 64)])
    eval_ids = token_ids(eval_x)
    assert len(eval_x) == 128
    assert train_ids.min() >= 13 and eval_ids.max() <= 12 and eval_ids.min() >= 3


def test_online_training_writes_a_self_describing_sae(lm_dir, tmp_path):
    text = write_documents(tmp_path / "docs.txt")
    cfg = hf_config(lm_dir, text, tmp_path)
    assert cfg.saes[0].sae.d_in == 64  # the model's hidden size
    source = make_source(cfg)
    trainer = Trainer(cfg, source)
    trainer.fit()
    from saekit.train.outputs import evaluate_member

    reports = [evaluate_member(m, source, cfg.eval_tokens, cfg.batch_size) for m in trainer.members]
    save_outputs(trainer.out_dir, {m.cfg.name: m.sae for m in trainer.members}, reports)
    assert reports[0].metrics.n_tokens == 128 and reports[0].metrics.l0 == pytest.approx(4.0)
    sae = SAE.load(tmp_path / "run" / cfg.saes[0].name)
    assert (sae.cfg.hook, sae.cfg.model_name) == (HOOK, str(lm_dir))
    # the scale is folded: the saved SAE reconstructs raw activations as the trained one does
    x = torch.cat([x for x, _ in source.eval_batches(64, 64)])
    torch.testing.assert_close(sae(x).x_hat, trainer.members[0].sae.eval()(x).x_hat)


def test_hook_wider_than_the_hidden_size_needs_d_in_and_the_error_names_both(lm_dir, tmp_path):
    text = write_documents(tmp_path / "docs.txt", n_docs=10)
    cfg = hf_config(lm_dir, text, tmp_path, hook="transformer.h.0.mlp.c_fc")
    with pytest.raises(ValueError, match=r"saes.0.sae.d_in = 64 .* width 256"):
        make_source(cfg)


def test_hf_data_fields_are_checked_with_their_names(lm_dir, tmp_path):
    text = write_documents(tmp_path / "docs.txt", n_docs=5)
    with pytest.raises(ValueError, match="data.text_file: no such file"):
        hf_config(lm_dir, tmp_path / "missing.txt", tmp_path)
    with pytest.raises(ValueError, match="exactly one of data.dataset and data.text_file"):
        hf_config(lm_dir, text, tmp_path, dataset="some/dataset")
    with pytest.raises(ValueError, match="data.model_dtype"):
        hf_config(lm_dir, text, tmp_path, model_dtype="int8")


def test_init_sample_comes_from_the_training_stream_without_a_second_read(
    lm_dir, tmp_path, monkeypatch
):
    # A corpus smaller than the shuffle buffer: filling the buffer runs the model on the
    # whole epoch. The sample and then the first batch must cost one such fill, not two.
    from saekit.data.lm.harvester import Harvester

    text = write_documents(tmp_path / "docs.txt", n_docs=60)
    cfg = hf_config(lm_dir, text, tmp_path, prefetch=0, shuffle_buffer_tokens=4096)
    fresh = take(make_source(cfg).batches(), 3)
    forwards = []
    harvest = Harvester.__call__
    monkeypatch.setattr(
        Harvester,
        "__call__",
        lambda self, ids, mask=None: forwards.append(1) or harvest(self, ids, mask),
    )
    source = make_source(cfg)
    source.init_tokens = 4 * 64
    n_probe = len(forwards)  # the width probe at construction
    sample = source.sample_for_init()
    after_sample = len(forwards) - n_probe
    stream = take(source.batches(), 3)
    assert after_sample > 1 and len(forwards) - n_probe == after_sample  # no forward after it
    assert torch.equal(sample[: 3 * 64], torch.cat(fresh))
    for got, expected in zip(stream, fresh, strict=True):
        assert torch.equal(got, expected)
    assert len(take(source.batches(), 1)) == 1  # a later batches(0) is a fresh stream
