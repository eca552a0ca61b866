"""``saekit report`` of a cross-layer transcoder and of a crosscoder on a tiny random Llama: each
reported latent's decoder norms per target layer or source (report.json and the pages' data-value
numbers) against plain loops over the saved weights, the summary histogram, and the metrics of an
independent pass."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from test_replacement import INPUTS, TARGETS, Weights
from test_report_site import Tree, render
from test_sources import write_documents

from saekit.cli import main
from saekit.data.documents.reading import documents
from saekit.data.lm.harvester import Harvester, TokenFilter, unpack_batch
from saekit.data.lm.text import token_batches
from saekit.model.crosscoder import Crosscoder, CrosscoderConfig
from saekit.model.dictionary import load_dictionary

L, D, M = 3, 64, 16
CONTEXT, BATCH, N_BATCHES = 16, 4, 3
SOURCES = [INPUTS[0], INPUTS[2]]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("report-multi")
    make_tiny_llama(seed=0, n_layer=L).save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    write_documents(root / "docs.txt", n_docs=60)
    weights = Weights(seed=6)
    weights.b_enc[:, :3] = 0.05  # every latent may fire (the report's contexts)
    weights.clt().save(root / "clt")
    torch.manual_seed(7)
    cc = Crosscoder(
        CrosscoderConfig(
            d_in=D, d_sae=12, n_sources=2, activation={"kind": "topk", "k": 3}, hooks=SOURCES
        )
    )
    with torch.no_grad():  # planted: latents 0-1 only in source A, 2-3 only in B, 4-5 shared
        cc.W_dec[1, :2] *= 0.05
        cc.W_dec[0, 2:4] *= 0.1
        cc.W_dec[1, 4:6] = cc.W_dec[0, 4:6] * 0.9
        cc.scale.copy_(torch.tensor([2.0, 2.0]))
    cc.save(root / "cc")
    return root


def write_report(root, name, *flags):
    argv = ["report", str(root / name), "--model", str(root / "m"), "--local-files-only"]
    argv += ["--text-file", str(root / "docs.txt"), "--context-length", str(CONTEXT)]
    argv += ["--batch-size", str(BATCH), "--max-tokens", str(CONTEXT * BATCH * N_BATCHES)]
    assert (
        main([*argv, "--top-k", "3", "--no-progress", "--out", str(root / f"{name}-site"), *flags])
        == 0
    )
    site = root / f"{name}-site"
    return site, json.loads((site / "report.json").read_text())


def norm(row):
    return math.sqrt(sum(v * v for v in row))


def page_norms(site, latent):
    """The (label, norm) rows of a latent page's decoder-norm table, read from the HTML."""
    tree = Tree((site / f"latent-{latent}.html").read_text()).root
    table = tree.all("table", id="decoder-norms")[0]
    return [
        (row.all("td")[0].full_text(), float(row.all("span")[0].attrs["data-value"]))
        for row in table.all("tbody")[0].all("tr")
    ]


def test_a_clt_report_shows_each_latents_norm_per_target_layer(root, tiny_tokenizer):
    site, data = write_report(root, "clt", "--latents", "6")
    clt = load_dictionary(root / "clt")  # saved weights: the scales folded into W_dec
    ids = [e["id"] for e in data["latents"]]
    assert ids == [0, 1, M, M + 1, 2 * M, 2 * M + 1]  # the first 2 of each layer
    shares = []
    for e in data["latents"]:
        layer, i = divmod(e["id"], M)
        want = [
            [TARGETS[t], norm(clt.W_dec[layer][i, t - layer].tolist())] for t in range(layer, L)
        ]
        assert e["decoder_norms"]["layer"] == layer
        for (label, got), (want_label, value) in zip(
            e["decoder_norms"]["norms"], want, strict=True
        ):
            assert label == want_label and got == pytest.approx(value, rel=1e-6)
        assert page_norms(site, e["id"]) == [(a, pytest.approx(b, rel=1e-6)) for a, b in want]
        total = sum(v for _, v in want)
        share = e["decoder_norms"]["own_layer_share"]
        if layer == L - 1:
            assert share is None
        else:
            assert share == pytest.approx(want[0][1] / total, rel=1e-6)
            shares.append(share)
    summary = data["summary"]["decoder_norms"]
    assert summary["kind"] == "target" and summary["labels"] == TARGETS
    assert sum(summary["own_layer_share_histogram"]) == (L - 1) * M
    index = (site / "index.html").read_text()
    assert "own-layer share of decoder norm" in index and 'data-col="own_layer_share"' in index
    # the metrics: the pooled FVU of an independent pass of the CLT over the harvested hooks
    harvester = Harvester(
        make_tiny_llama(seed=0, n_layer=L),
        INPUTS + TARGETS,
        token_filter=TokenFilter(bos_token_id=1),
    )
    batches = token_batches(
        documents(text_file=str(root / "docs.txt")),
        tiny_tokenizer,
        context_length=CONTEXT,
        batch_size=BATCH,
        bos_token="auto",
    )
    acts = [harvester(*unpack_batch(b)) for _, b in zip(range(N_BATCHES), batches, strict=False)]
    x = torch.cat([torch.cat([a[h] for h in INPUTS], -1) for a in acts])
    y = torch.cat([torch.cat([a[h] for h in TARGETS], -1) for a in acts]).double()
    with torch.no_grad():
        y_hat = clt(x).x_hat.double()
    err = sum(float((y - y_hat)[:, t * D : (t + 1) * D].pow(2).sum()) for t in range(L))
    var = sum(
        float((y[:, t * D : (t + 1) * D] - y[:, t * D : (t + 1) * D].mean(0)).pow(2).sum())
        for t in range(L)
    )
    assert data["summary"]["n_tokens"] == x.shape[0]
    assert data["summary"]["fvu"] == pytest.approx(err / var, rel=1e-5)


def test_a_crosscoder_report_classifies_each_latent_by_its_norms(root):
    site, data = write_report(root, "cc", "--latent-ids", *map(str, range(12)))
    cc = load_dictionary(root / "cc")
    classes = {}
    for e in data["latents"]:
        i = e["id"]
        a, b = norm(cc.W_dec[0, i].tolist()), norm(cc.W_dec[1, i].tolist())
        delta = 0.5 * ((b - a) / max(a, b) + 1)  # Minder et al. 2025, §2
        assert e["decoder_norms"]["relative_norm"] == pytest.approx(delta, abs=1e-6)
        assert page_norms(site, i) == [
            (SOURCES[0], pytest.approx(a, rel=1e-6)),
            (SOURCES[1], pytest.approx(b, rel=1e-6)),
        ]
        classes[i] = e["decoder_norms"]["class"]
    assert [classes[i] for i in range(6)] == [f"only {SOURCES[0]}"] * 2 + [
        f"only {SOURCES[1]}"
    ] * 2 + ["shared"] * 2
    summary = data["summary"]["decoder_norms"]
    assert summary["only"][0] >= 2 and summary["only"][1] >= 2 and summary["shared"] >= 2
    assert sum(summary["relative_norm_histogram"]) == 12
    index = Tree((site / "index.html").read_text()).root
    assert index.all("span", data_key="only-1")[0].attrs["data-value"] == repr(summary["only"][1])


def test_a_multi_hook_report_refuses_hook_and_synthetic(root, capsys):
    for flag in (["--hook", "x"], ["--synthetic"]):
        assert main(["report", str(root / "cc"), *flag, "--no-progress"]) == 2
        assert "reads the model hooks its cfg.json names" in capsys.readouterr().err


@pytest.mark.slow  # Chromium: make test-slow
def test_the_pages_render_in_chromium_with_their_norms(root, tmp_path):
    site, data = write_report(root, "cc", "--latent-ids", "0", "2", "4")
    index = render(site / "index.html", tmp_path, "#sort=relative_norm")
    rows = [r for r in index.all("tr") if "data-latent" in r.attrs]
    assert [int(r.attrs["data-latent"]) for r in rows] == [2, 4, 0]  # sorted by Δ, descending
    charts = [f.full_text() for f in index.all("figcaption")]
    assert any("relative decoder norm" in c for c in charts)
    page = render(site / "latent-2.html", tmp_path)
    table = page.all("table", id="decoder-norms")[0]
    shown = [float(s.attrs["data-value"]) for s in table.all("span")]
    want = [v for _, v in data["latents"][1]["decoder_norms"]["norms"]]
    assert shown == want and shown[1] > 5 * shown[0]  # latent 2 writes to source B only
