"""``saekit eval`` of a saved cross-layer transcoder and crosscoder (saekit.eval.saved_multi) on a
tiny random Llama: the report's numbers are those of the splice and of a plain pass over the
cache's held-out shard."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_VOCAB, make_tiny_llama
from test_replacement import INPUTS, TARGETS, Weights
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


@torch.no_grad()
def sampled_documents(model, n_docs, length, seed=0):
    """Documents the model itself writes (words w0..w49, token ids 3..52 of the tiny tokenizer,
    sampled from its next-token distribution restricted to them, after BOS): on its own text
    the clean model's CE is below the ablated model's (Gibbs' inequality), so the CE score has
    a gap to measure; on random words a random model's CE is chance either way."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(n_docs, 1, dtype=torch.long)  # BOS
    words = torch.full((TINY_VOCAB,), float("-inf"))
    words[3:53] = 0
    for _ in range(length):
        p = torch.softmax(model(ids).logits[:, -1].float() + words, -1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return [" ".join(f"w{i - 3}" for i in row[1:].tolist()) for row in ids]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer):
    """A 3-layer tiny Llama with its tokenizer, documents, a saved CLT over its MLPs, a saved
    crosscoder over its three MLP inputs, and a cache of every one of those hooks."""
    root = tmp_path_factory.mktemp("multi")
    model = make_tiny_llama(seed=0, n_layer=L, initializer_range=0.2)
    model.save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    (root / "docs.txt").write_text("\n\n".join(sampled_documents(model, 80, 24)))
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


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """A 3-layer TopK CLT trained briefly on the cache of the tiny Llama's MLPs (saekit train)."""
    out = tmp_path_factory.mktemp("trained")
    data = {"source": "cache", "cache_dir": str(root / "cache"), "shuffle_buffer_tokens": 256,
            "input_hooks": INPUTS, "target_hooks": TARGETS}  # fmt: skip
    entry = {"name": "clt", "sae": {"kind": "clt", "d_sae": 32, "activation": {"kind": "topk",
             "k": 4}}, "lr": 1e-2, "warmup_steps": 5}  # fmt: skip
    run = {"data": data, "saes": [entry], "batch_size": 64, "steps": 80, "eval_tokens": 96,
           "log_every": 50, "checkpoint_every": 0, "progress": False,
           "out_dir": str(out / "run")}  # fmt: skip
    (out / "clt.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", "--config", str(out / "clt.yaml"), "--no-progress"]) == 0
    return out / "run"


def test_a_trained_clt_spliced_for_every_mlp_beats_zero_ablation(root, trained):
    flags = ["--model", str(root / "m"), "--text-file", str(root / "docs.txt")]
    report = run_eval(trained.parent, "run/clt", *flags)
    assert report["ce_zero"] > report["ce_clean"] + 0.05  # ablating the MLPs hurts
    assert report["ce_score"] > 0.2 and report["kl_score"] > 0.1, report  # beats zero-ablation
    assert all(layer["fvu"] < 1 for layer in report["per_layer"])


def test_the_runs_eval_json_has_the_per_layer_scores_of_saekit_eval(root, trained):
    """The post-training evaluation (held-out shard, eval_tokens) and ``saekit eval --cache``
    of the saved CLT read the same tokens: the same per-layer scores and decoder norms."""
    run_report = json.loads((trained / "clt" / "eval.json").read_text())
    saved = run_eval(trained.parent, "run/clt", "--cache", str(root / "cache"))
    assert run_report["n_tokens"] == saved["n_tokens"] == 96
    for got, want in zip(run_report["per_layer"], saved["per_layer"], strict=True):
        for key in ("fvu", "mse", "l0", "dead_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
        assert got["name"] in TARGETS and got["input_hook"] in INPUTS
    assert run_report["fvu"] == pytest.approx(saved["fvu"], rel=1e-5)
    norms_run, norms_saved = run_report["decoder_norms"], saved["decoder_norms"]
    assert norms_run["own_layer_share_histogram"] == norms_saved["own_layer_share_histogram"]
    for a, b in zip(
        norms_run["mean_own_layer_share"], norms_saved["mean_own_layer_share"], strict=True
    ):
        assert a == pytest.approx(b, rel=1e-5)


def test_the_core_suite_of_a_clt_is_saekit_eval_and_the_judged_suites_refuse_it(root, capsys):
    """``--suite core`` of a CLT (it once loaded the directory as an SAE: a config error) gives
    saekit eval's numbers; absorption and sparse probing read one hook's latents: refused."""
    plain = run_eval(root, "clt", "--cache", str(root / "cache"))
    argv = ["eval", "--sae", str(root / "clt"), "--cache", str(root / "cache"),
            "--batch-size", "2", "--context-length", "16", "--n-batches", "3"]  # fmt: skip
    out = root / "suite-clt"
    assert main([*argv, "--suite", "core", "--suite-out", str(out)]) == 0
    (report,) = (json.loads(p.read_text()) for p in out.glob("*.json"))
    assert report["core"]["fvu"] == pytest.approx(plain["fvu"])
    assert report["core"]["l0"] == pytest.approx(plain["l0"])
    capsys.readouterr()
    assert main([*argv, "--suite", "core,absorption", "--model", str(root / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "absorption: an SAE's or transcoder's suites" in err[-1] and "holds a clt" in err[-1]
