"""``saekit eval`` of a saved cross-layer transcoder and crosscoder (saekit.eval.saved_multi) on a
tiny random Llama: the report's numbers are those of the splice and of a plain pass over the
cache's held-out shard."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from test_replacement import INPUTS, TARGETS, Weights
from test_sources import write_documents
from transformers import AutoModelForCausalLM, AutoTokenizer

from saekit.cli import main
from saekit.data.cache.reading import ActivationCache
from saekit.data.documents.reading import documents
from saekit.data.hook_columns import select_columns
from saekit.data.lm.harvester import TokenFilter
from saekit.data.lm.text import token_batches
from saekit.data.sources.cache import held_out_batches
from saekit.eval.dictionaries import decoder_norms
from saekit.eval.replacement import LayeredDictionary, replacement_eval
from saekit.model.crosscoder import Crosscoder, CrosscoderConfig
from saekit.model.dictionary import load_dictionary

L, D = 3, 64


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer):
    """A 3-layer tiny Llama with its tokenizer, documents, a saved CLT over its MLPs, a saved
    crosscoder over its three MLP inputs, and a cache of every one of those hooks."""
    root = tmp_path_factory.mktemp("multi")
    make_tiny_llama(seed=0, n_layer=L, initializer_range=0.2).save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    write_documents(root / "docs.txt", n_docs=60)
    Weights(seed=4).clt().save(root / "clt")
    torch.manual_seed(5)
    cc = Crosscoder(
        CrosscoderConfig(
            d_in=D, d_sae=24, n_sources=L, activation={"kind": "topk", "k": 4}, hooks=INPUTS
        )
    )
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.scale.copy_(torch.tensor([0.5, 2.0, 1.5]))  # folded on save
    cc.save(root / "cc")
    argv = ["cache", "--model", str(root / "m"), "--local-files-only", "--hooks"]
    argv += [*INPUTS, *TARGETS, "--text-file", str(root / "docs.txt"), "--context-length", "16"]
    argv += ["--batch-size", "4", "--shard-tokens", "256", "--max-tokens", "1200"]
    assert main([*argv, "--no-progress", "--out", str(root / "cache")]) == 0
    return root


def run_eval(root, sae, *flags):
    out = root / f"{sae}-{len(flags)}.json"
    argv = ["eval", "--sae", str(root / sae), *flags, "--json", str(out)]
    assert main([*argv, "--batch-size", "2", "--context-length", "16", "--n-batches", "3"]) == 0
    return json.loads(out.read_text())


def test_a_clt_on_a_causal_lm_reports_the_replacement_splice(root, capsys):
    report = run_eval(
        root, "clt", "--model", str(root / "m"), "--text-file", str(root / "docs.txt")
    )
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(root / "m").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "m")
    batches = token_batches(
        documents(text_file=str(root / "docs.txt")), tokenizer, context_length=16, batch_size=2
    )
    clt = load_dictionary(root / "clt")
    want = replacement_eval(
        model,
        LayeredDictionary.of(clt),
        [next(batches) for _ in range(3)],
        token_filter=TokenFilter.from_tokenizer(tokenizer),
    )
    assert report["ce_score"] == pytest.approx(want.splice.ce_score, rel=1e-6)
    assert report["kl_sae"] == pytest.approx(want.splice.kl_sae, rel=1e-6)
    assert report["fvu"] == pytest.approx(want.whole.fvu, rel=1e-6)
    assert report["l0"] == pytest.approx(want.whole.l0) and report["d_sae"] == L * 16
    assert [p["name"] for p in report["per_layer"]] == TARGETS
    for got, layer in zip(report["per_layer"], want.layers, strict=True):
        assert got["spliced_fvu"] == pytest.approx(layer.spliced_fvu, rel=1e-6)
        assert got["l0"] == pytest.approx(layer.l0)
    assert len(report["decoder_norms"]["mean_own_layer_share"]) == L - 1
    assert f"0      {report['per_layer'][0]['fvu']:8.4f}" in printed  # the per-layer table


def cache_rows(root, hooks):
    cache = ActivationCache(root / "cache")
    columns = select_columns(cache.hooks, hooks)
    return torch.cat(list(held_out_batches(cache, 3 * 2 * 16, 32, columns))).double()


def test_a_clt_on_a_cache_reports_each_target_by_plain_loops(root):
    report = run_eval(root, "clt", "--cache", str(root / "cache"))
    rows = cache_rows(root, INPUTS + TARGETS)
    weights = Weights(seed=4)
    n = rows.shape[0]
    assert report["n_tokens"] == n
    for t in range(L):
        ys = rows[:, (L + t) * D : (L + t + 1) * D].tolist()
        errs = 0.0
        for i in range(n):
            xs = [rows[i, layer * D : (layer + 1) * D].tolist() for layer in range(t + 1)]
            pred = weights.token_prediction(t, xs)
            errs += sum((p - y) ** 2 for p, y in zip(pred, ys[i], strict=True))
        mean = [sum(y[j] for y in ys) / n for j in range(D)]
        var = sum((y[j] - mean[j]) ** 2 for y in ys for j in range(D))
        assert report["per_layer"][t]["fvu"] == pytest.approx(errs / var, rel=1e-4)
        assert "spliced_fvu" not in report["per_layer"][t]


def test_a_crosscoder_reports_each_source_and_its_norm_classes(root):
    on_cache = run_eval(root, "cc", "--cache", str(root / "cache"))
    on_model = run_eval(
        root, "cc", "--model", str(root / "m"), "--text-file", str(root / "docs.txt")
    )
    cc = load_dictionary(root / "cc")
    rows = cache_rows(root, INPUTS)
    with torch.no_grad():
        x_hat = cc(rows.float()).x_hat.double()
    for s in range(L):
        x, xh = rows[:, s * D : (s + 1) * D], x_hat[:, s * D : (s + 1) * D]
        fvu = float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert on_cache["per_source"][s]["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert "ce_score" not in on_model and on_model["per_source"][0]["name"] == INPUTS[0]
    norms = decoder_norms(cc)
    assert norms.shape == (L, 24)
    summary = on_cache["decoder_norms"]
    assert summary["shared"] + sum(summary["only"]) + summary["other"] == 24
    assert summary["sources"] == INPUTS and "relative_norm_histogram" not in summary


def test_a_hook_flag_is_refused_for_a_clt(root, capsys):
    argv = ["eval", "--sae", str(root / "clt"), "--cache", str(root / "cache"), "--hook", "x"]
    assert main(argv) == 2
    assert "a cross-layer transcoder reads the hooks its cfg.json names" in capsys.readouterr().err
