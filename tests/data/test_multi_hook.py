"""N hooks per forward pass: harvesting, caching (manifest v2, old caches) and hook selection.

A tiny random Llama (built from a config) with three hooks of unequal widths, in firing order:
layer 0's MLP input (64), its down-projection's input (128, inside the MLP) and layer 1's MLP
output (64). The harvest stops after the last; the final norm and the LM head never run.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_llama
from test_sources import write_documents

from saekit.cli import main
from saekit.data.cache.reading import ActivationCache, CacheError
from saekit.data.cache.writing import write_cache
from saekit.data.hook_columns import select_columns, split_hooks
from saekit.data.lm.harvester import Harvester, TokenFilter
from saekit.data.sources.cache import CacheSource
from saekit.train.config import build_run_config, make_source

H1, H2, H3 = "model.layers.0.mlp:input", "model.layers.0.mlp.down_proj:input", "model.layers.1.mlp"
HOOKS = [H1, H2, H3]
WIDTHS = {H1: 64, H2: 128, H3: 64}
KEEP_ALL = TokenFilter(exclude_bos=False)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama(seed=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer, llama):
    path = tmp_path_factory.mktemp("lm") / "tiny-llama"
    llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def counted(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_three_hooks_equal_three_one_hook_harvests_from_one_stopped_pass(llama):
    ids = torch.randint(2, TINY_VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    single = {h: Harvester(llama, h, token_filter=KEEP_ALL)(ids)[h] for h in HOOKS}
    layer0, norm, head = (
        counted(m) for m in (llama.model.layers[0], llama.model.norm, llama.lm_head)
    )
    acts = Harvester(llama, HOOKS, token_filter=KEEP_ALL)(ids)
    assert (len(layer0), len(norm), len(head)) == (1, 0, 0)  # one pass, stopped after H3
    assert list(acts) == HOOKS
    for h in HOOKS:
        assert acts[h].shape == (30, WIDTHS[h]) and torch.equal(acts[h], single[h])


def cache_argv(llama_dir, docs, out, *hook_flags):
    argv = ["cache", "--model", str(llama_dir), "--local-files-only", *hook_flags]
    argv += ["--text-file", str(docs), "--context-length", "16", "--batch-size", "8"]
    return [*argv, "--shard-tokens", "128", "--max-tokens", "600", "--no-progress", "--out", out]


@pytest.fixture(scope="module")
def caches(llama_dir, tmp_path_factory):
    """`saekit cache --hooks H1 H2 H3` and the three `saekit cache --hook H` of the same tokens."""
    root = tmp_path_factory.mktemp("caches")
    docs = write_documents(root / "docs.txt")
    assert main(cache_argv(llama_dir, docs, str(root / "all"), "--hooks", *HOOKS)) == 0
    for i, h in enumerate(HOOKS):
        assert main(cache_argv(llama_dir, docs, str(root / f"h{i}"), "--hook", h)) == 0
    return root


def test_a_three_hook_cache_holds_the_three_one_hook_caches(caches, capsys):
    cache = ActivationCache(caches / "all")
    assert cache.hooks == [(h, WIDTHS[h]) for h in HOOKS] and cache.d == 256
    manifest = json.loads((caches / "all" / "manifest.json").read_text())
    assert manifest["hooks"] == [{"name": h, "width": WIDTHS[h]} for h in HOOKS]
    assert main(["cache", "verify", str(caches / "all")]) == 0
    assert f"hook(s) {H1} (64), {H2} (128), {H3} (64); verified" in capsys.readouterr().out
    for s in range(len(cache.shards)):
        parts = split_hooks(cache.load_shard(s), cache.hooks)
        for i, h in enumerate(HOOKS):
            assert torch.equal(parts[h], ActivationCache(caches / f"h{i}").load_shard(s))


def test_cache_round_trip_of_three_hooks_and_its_checks(tmp_path):
    g = torch.Generator().manual_seed(0)
    widths = {"a": 3, "c": 5, "b": 2}  # not in sorted order: columns follow the given order
    batches = [{h: torch.randn(n, w, generator=g) for h, w in widths.items()} for n in (7, 20, 9)]
    write_cache(tmp_path / "c", batches, list(widths), "toy", shard_tokens=16)
    cache = ActivationCache(tmp_path / "c")
    cache.verify()
    rows = torch.cat([cache.load_shard(i) for i in range(len(cache.shards))])
    for h, part in split_hooks(rows, cache.hooks).items():
        assert torch.equal(part, torch.cat([b[h] for b in batches]))
    batches[2]["c"], batches[2]["b"] = torch.zeros(9, 4), torch.zeros(9, 3)  # same total width
    with pytest.raises(ValueError, match="batch 2 has width 4 at hook 'c', the cache has 5"):
        write_cache(tmp_path / "d", batches, list(widths), "toy", shard_tokens=16)
    with pytest.raises(CacheError, match="different settings.*hooks"):
        write_cache(tmp_path / "c", batches, ["a", "b", "c"], "toy", shard_tokens=16)


def test_verify_catches_a_wrong_width_for_one_hook(caches, tmp_path, capsys):
    import shutil

    shutil.copytree(caches / "all", tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    m = json.loads(path.read_text())
    m["hooks"][1]["width"] = 127
    path.write_text(json.dumps(m))
    assert main(["cache", "verify", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{H2} (127)" in err and "do not add up to the width of its rows d = 256" in err


def old_manifest(directory):
    """Rewrite a cache's manifest as version 1 wrote it: hook (+ target_hook and d_in)."""
    path = directory / "manifest.json"
    m = json.loads(path.read_text())
    (first, d_in), *rest = [(h["name"], h["width"]) for h in m.pop("hooks")]
    m.update(version=1, hook=first)
    if rest:
        m.update(target_hook=rest[0][0], d_in=d_in)
    path.write_text(json.dumps(m))


def test_old_caches_load_as_one_and_two_hook_caches(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(n, 3, generator=g), "y": torch.randn(n, 5, generator=g)}
               for n in (40, 40)]  # fmt: skip
    write_cache(tmp_path / "pair", batches, "x", "toy", target_hook="y", shard_tokens=32)
    write_cache(tmp_path / "one", [b["y"] for b in batches], "y", "toy", shard_tokens=32)
    old_manifest(tmp_path / "pair")
    old_manifest(tmp_path / "one")
    pair, one = ActivationCache(tmp_path / "pair"), ActivationCache(tmp_path / "one")
    pair.verify()
    one.verify()
    assert (pair.hooks, pair.hook, one.hooks) == ([("x", 3), ("y", 5)], "x", [("y", 5)])
    saes = [{"sae": {"d_sae": 8, "activation": {"kind": "topk", "k": 2}}}]
    cfg = build_run_config({"data": {"source": "cache", "cache_dir": str(tmp_path / "pair")},
                            "saes": saes, "batch_size": 16})  # fmt: skip
    sae = cfg.saes[0].sae
    assert (sae.d_in, sae.d_out, sae.hook, sae.target_hook) == (3, 5, "x", "y")
    first = next(iter(CacheSource(tmp_path / "pair", 16, 0, 0).batches()))
    assert torch.equal(first, torch.cat([batches[0]["x"], batches[0]["y"]], dim=-1)[:16])


def test_an_interrupted_old_transcoder_cache_resumes_as_version_2(tmp_path):
    from test_cache import Interrupted, interrupted_after

    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(n, 3, generator=g), "y": torch.randn(n, 5, generator=g)}
               for n in (20, 30, 25)]  # fmt: skip
    write_cache(tmp_path / "whole", batches, "x", "toy", target_hook="y", shard_tokens=16)
    with pytest.raises(Interrupted):
        part = interrupted_after(batches, 2)
        write_cache(tmp_path / "old", part, "x", "toy", target_hook="y", shard_tokens=16)
    old_manifest(tmp_path / "old")  # as an older saekit left it
    write_cache(tmp_path / "old", batches, "x", "toy", target_hook="y", shard_tokens=16)
    resumed = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert resumed == json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert resumed["version"] == 2 and "target_hook" not in resumed


def run_config(cache_dir, tmp_path, **data):
    return build_run_config(
        {
            "data": {"source": "cache", "cache_dir": str(cache_dir), **data},
            "saes": [{"sae": {"d_sae": 32, "activation": {"kind": "topk", "k": 4}}}],
            "batch_size": 32,
            "steps": 3,
            "eval_tokens": 64,
            "log_every": 3,
            "checkpoint_every": 0,
            "progress": False,
            "out_dir": str(tmp_path / "run"),
        }
    )


@pytest.mark.parametrize(
    ("selection", "stream"),
    [({"hook": H2}, [H2]), ({"hook": H1, "target_hook": H3}, [H1, H3])],
    ids=["one-hook", "pair"],
)
def test_a_run_trains_on_the_hooks_it_selects_from_a_three_hook_cache(
    caches, tmp_path, selection, stream
):
    from saekit.train.trainer import Trainer

    cfg = run_config(caches / "all", tmp_path, shuffle_buffer_tokens=0, **selection)
    sae = cfg.saes[0].sae
    assert (sae.hook, sae.target_hook) == (stream[0], stream[1] if len(stream) == 2 else None)
    assert (sae.d_in, sae.d_out) == (WIDTHS[stream[0]], WIDTHS[stream[1]] if stream[1:] else None)
    source = make_source(cfg)
    cache = ActivationCache(caches / "all")
    rows = split_hooks(cache.load_shard(0), cache.hooks)
    expected = torch.cat([rows[h] for h in stream], dim=-1)[:32]
    assert torch.equal(next(iter(source.batches())), expected)
    (x, _), *_ = source.eval_batches(32, 32)
    held = split_hooks(cache.load_shard(cache.held_out_shard), cache.hooks)
    assert torch.equal(x, torch.cat([held[h] for h in stream], dim=-1)[:32])
    trainer = Trainer(cfg, source)
    trainer.fit()
    trained = trainer.members[0].sae
    assert trained.cfg.stream_width == sum(WIDTHS[h] for h in stream)
    trained.save(tmp_path / "sae")  # `saekit eval --cache` scores it on its hooks' columns
    argv = ["eval", "--sae", str(tmp_path / "sae"), "--cache", str(caches / "all")]
    assert main([*argv, "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    y = torch.cat([held[h] for h in stream], dim=-1)[: report["n_tokens"]]
    with torch.no_grad():
        x_hat = trained.eval()(y[:, : WIDTHS[stream[0]]]).x_hat.double()
    target = y[:, -WIDTHS[stream[-1]] :].double()
    fvu = (target - x_hat).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    assert report["fvu"] == pytest.approx(float(fvu), rel=1e-4)


def test_a_three_hook_cache_without_a_selection_is_refused_in_one_line(caches, tmp_path):
    with pytest.raises(ValueError, match=r"holds 3 hooks \(.*\): set data\.hook") as info:
        run_config(caches / "all", tmp_path)
    assert "\n" not in str(info.value)
    for data, message in [
        ({"hook": "model.layers.5.mlp"}, r"data\.hook 'model\.layers\.5\.mlp' is not one of"),
        ({"target_hook": H3}, r"data\.target_hook needs data\.hook"),
        ({"hook": H1, "target_hook": H1}, "are the same hook"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_config(caches / "all", tmp_path, **data)
    with pytest.raises(ValueError, match=r"hook\(s\) \['nope'\] not among the hooks"):
        CacheSource(caches / "all", 32, 0, 0, hooks=["nope"])  # a slip outside the config


def test_the_online_source_harvests_its_hooks_and_yields_the_selected(llama_dir, tmp_path):
    docs = write_documents(tmp_path / "docs.txt")
    data = {"source": "hf", "model": str(llama_dir), "text_file": str(docs), "context_length": 16}
    data.update(model_batch_size=4, local_files_only=True, shuffle_buffer_tokens=0, keep_bos=True)
    sae = {"d_sae": 32, "activation": {"kind": "topk", "k": 4}}
    raw = {"saes": [{"sae": sae}], "batch_size": 32, "eval_tokens": 64}
    with pytest.raises(ValueError, match=r"holds 3 hooks"):
        build_run_config({**raw, "data": {**data, "hooks": HOOKS}})
    cfg = build_run_config({**raw, "data": {**data, "hooks": HOOKS, "hook": H1, "target_hook": H3}})
    tc = cfg.saes[0].sae
    assert (tc.hook, tc.target_hook, tc.d_in, tc.d_out) == (H1, H3, 64, 64)
    source = make_source(cfg)
    assert [str(h) for h in source.harvester.hooks] == HOOKS and source.d == 128
    pair = make_source(build_run_config({**raw, "data": {**data, "hook": H1, "target_hook": H3}}))
    for a, b in zip(
        itertools.islice(source.batches(), 3), itertools.islice(pair.batches(), 3), strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"data\.hooks names a hook twice"):
        build_run_config({**raw, "data": {**data, "hooks": [H1, H1]}})


def test_select_columns_is_a_view_when_adjacent():
    segments = [("a", 2), ("b", 3), ("c", 1)]
    assert select_columns(segments, ["b", "c"]) == slice(2, 6)
    assert select_columns(segments, ["a", "c"]).tolist() == [0, 1, 5]
    assert select_columns(segments, ["c", "a"]).tolist() == [5, 0, 1]


def test_cache_refuses_hooks_with_hook(llama_dir, tmp_path, capsys):
    argv = cache_argv(llama_dir, "docs", str(tmp_path / "c"), "--hooks", H1, "--hook", H3)
    assert main(argv) == 2
    assert "takes --hooks or --hook (and --target-hook), not both" in capsys.readouterr().err
