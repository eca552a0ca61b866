"""``saekit eval`` of a crosscoder over the same hook of two models (model diffing): with
``--models`` each model runs on the same tokens (saekit.data.lm.model_set) and the per-source
FVU is that of a plain float64 pass over what each model gives alone; with ``--cache`` alone, that
of the two-model cache's held-out shard. The two tiny Llamas (one perturbed) and the cache are
tests/data/test_model_set.py's."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_model_set import L1, caches, pair  # noqa: F401  (fixtures)
from transformers import AutoTokenizer, LlamaForCausalLM

from saekit.cli import main
from saekit.data.cache.reading import ActivationCache
from saekit.data.documents.reading import documents
from saekit.data.lm.harvester import Harvester, TokenFilter, unpack_batch
from saekit.data.lm.text import token_batches
from saekit.data.sources.cache import held_out_batches
from saekit.model.config import SAEConfig
from saekit.model.crosscoder import Crosscoder, CrosscoderConfig
from saekit.model.dictionary import load_dictionary
from saekit.model.sae import SAE

HOOKS = [f"base/{L1}", f"ft/{L1}"]
D, CONTEXT, BATCH, N_BATCHES = 64, 16, 2, 3


@pytest.fixture(scope="module")
def diff(pair, tmp_path_factory):  # noqa: F811
    """A crosscoder over block 1 of both models (random, nonzero b_dec, unequal source scales)
    and an SAE on base's block 1, saved."""
    root = tmp_path_factory.mktemp("diff")
    torch.manual_seed(3)
    cc = Crosscoder(CrosscoderConfig(d_in=D, d_sae=24, n_sources=2, hooks=HOOKS,
                                     activation={"kind": "topk", "k": 4}))  # fmt: skip
    with torch.no_grad():
        cc.b_dec.normal_(std=0.05)
        cc.scale.copy_(torch.tensor([0.5, 2.0]))  # folded on save
    cc.save(root / "cc")
    SAE(SAEConfig(d_in=D, d_sae=8, activation={"kind": "topk", "k": 2}, hook=HOOKS[0])).save(
        root / "sae"
    )
    return root


def run_eval(diff, *flags):
    out = diff / f"eval-{len(flags)}.json"
    argv = ["eval", "--sae", str(diff / "cc"), *flags, "--json", str(out)]
    argv += ["--batch-size", str(BATCH), "--context-length", str(CONTEXT)]
    assert main([*argv, "--n-batches", str(N_BATCHES)]) == 0
    return json.loads(out.read_text())


def per_source_fvu(cc, rows):
    with torch.no_grad():
        x_hat = cc(rows.float()).x_hat.double()
    fvus = []
    for s in range(2):
        x, xh = rows[:, s * D : (s + 1) * D], x_hat[:, s * D : (s + 1) * D]
        fvus.append(float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    return fvus


def test_a_crosscoder_over_two_models_is_evaluated_on_both(pair, diff):  # noqa: F811
    base, ft, _, docs = pair
    models = ["--models", f"base={base}", f"ft={ft}", "--local-files-only"]
    report = run_eval(diff, *models, "--text-file", str(docs))
    # each model alone, its own harvester, on the same packed contexts
    tokenizer = AutoTokenizer.from_pretrained(base)
    contexts = list(itertools.islice(token_batches(
        documents(text_file=str(docs)), tokenizer, context_length=CONTEXT, batch_size=BATCH
    ), N_BATCHES))  # fmt: skip
    parts = []
    for path in (base, ft):
        harvester = Harvester(LlamaForCausalLM.from_pretrained(path), [L1],
                              token_filter=TokenFilter.from_tokenizer(tokenizer))  # fmt: skip
        parts.append(torch.cat([harvester(*unpack_batch(b))[L1] for b in contexts]))
    rows = torch.cat(parts, dim=-1).double()
    cc = load_dictionary(diff / "cc")
    assert report["n_tokens"] == len(rows) and report["model"] == f"base={base}, ft={ft}"
    assert [p["name"] for p in report["per_source"]] == HOOKS
    for got, want in zip(report["per_source"], per_source_fvu(cc, rows), strict=True):
        assert got["fvu"] == pytest.approx(want, rel=1e-4)


def test_a_crosscoder_over_two_models_is_evaluated_on_their_cache(diff, caches):  # noqa: F811
    report = run_eval(diff, "--cache", str(caches / "two"))
    rows = torch.cat(list(held_out_batches(ActivationCache(caches / "two"), 96, 32))).double()
    assert report["n_tokens"] == len(rows) > 0
    cc = load_dictionary(diff / "cc")
    for got, want in zip(report["per_source"], per_source_fvu(cc, rows), strict=True):
        assert got["fvu"] == pytest.approx(want, rel=1e-4)


def test_models_are_refused_where_one_model_is_read(pair, diff, capsys):  # noqa: F811
    base, ft, _, docs = pair
    models = ["--models", f"base={base}", f"ft={ft}", "--text-file", str(docs)]
    for argv, message in (
        (["eval", "--sae", str(diff / "sae"), *models],
         "--models: an SAE or transcoder reads one model's hook; give --model"),
        (["eval", "--sae", str(diff / "cc"), *models, "--suite", "absorption"],
         "--suite evaluates an SAE on one model: give --model, not --models"),
        (["eval", "--sae", str(diff / "cc"), "--models", f"base={base}"],
         "--models names the models run on the same tokens"),
    ):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
