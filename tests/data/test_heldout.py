"""Held out by construction (issue 18): a cache records which documents its held-out shard holds,
an SAE records the documents it trained on, and ``saekit eval`` evaluates exactly the held-out
documents and warns when it evaluates training documents. Tiny random GPT-2, local text."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SMALL_RUN_ARGS, TINY_SAE_ARGS, make_tiny_gpt2

from saekit.cli import main
from saekit.data.documents.ranges import count, intersect, subtract, to_ranges, union
from saekit.data.documents.reading import select
from saekit.data.lm.text import NO_DOCUMENT, pack_documents
from saekit.model.sae import SAE

HOOK = "transformer.h.1:input"
CONTEXT = 16
SHARD = 512
MAX_TOKENS = 2000


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):
    """(model dir, text file, words per document): 150 documents of 5-39 one-token words."""
    root = tmp_path_factory.mktemp("heldout")
    make_tiny_gpt2().save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    rng = random.Random(0)
    docs = [[f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 40))] for _ in range(150)]
    (root / "docs.txt").write_text("\n\n".join(" ".join(d) for d in docs))
    return root / "m", root / "docs.txt", [len(d) for d in docs]


def model_args(lm, text=True):
    model, docs, _ = lm
    args = ["--model", str(model), "--hook", HOOK, "--local-files-only"]
    return args + ["--context-length", str(CONTEXT)] + (["--text-file", str(docs)] if text else [])


def expected_shard_documents(lengths):
    """Each shard's documents, computed apart from saekit: contexts are BOS + 15 body tokens;
    the body is every document followed by a separator, which is the BOS id (GPT-2 style) and
    so dropped with BOS; the incomplete last context is dropped; then --max-tokens and shards."""
    body: list[int | None] = []
    for doc, n in enumerate(lengths):
        body += [doc] * n + [None]  # None: the separator
    body = body[: len(body) // (CONTEXT - 1) * (CONTEXT - 1)]
    kept = [doc for doc in body if doc is not None][:MAX_TOKENS]
    return [set(kept[i : i + SHARD]) for i in range(0, len(kept), SHARD)]


@pytest.fixture(scope="module")
def cache(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    argv = ["cache", *model_args(lm), "--batch-size", "8", "--shard-tokens", str(SHARD)]
    assert main([*argv, "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def cache_sae(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert (
        main(["train", "--cache", str(cache), *SMALL_RUN_ARGS, *TINY_SAE_ARGS, "--out", str(out)])
        == 0
    )
    return out / "topk-k4-M64"


def evaluate(argv, tmp_path, capsys):
    path = tmp_path / "eval.json"
    assert main(["eval", *argv, "--n-batches", "100", "--json", str(path)]) == 0
    return json.loads(path.read_text()), capsys.readouterr().err


# ---------------------------------------------------------------- ranges and packing


def test_document_ranges_are_exact_set_operations():
    a = to_ranges([7, 1, 2, 3, 3, 9])
    assert a == [[1, 4], [7, 8], [9, 10]] and count(a) == 5
    assert union(a, [[4, 7]]) == [[1, 8], [9, 10]]
    assert subtract([[0, None]], a) == [[0, 1], [4, 7], [8, 9], [10, None]]
    assert intersect(a, [[3, None]]) == [[3, 4], [7, 8], [9, 10]]
    assert list(select(iter("abcdefghijk"), a)) == [
        (1, "b"),
        (2, "c"),
        (3, "d"),
        (7, "h"),
        (9, "j"),
    ]
    with pytest.raises(ValueError, match="unbounded"):
        count([[3, None]])


def test_packing_names_the_document_of_every_position():
    docs = [(10, [5, 6, 7]), (11, [8]), (12, [9, 9, 9, 9])]
    packed = list(pack_documents(docs, 4, separator_id=1, bos_id=2))
    assert packed == [
        ([2, 5, 6, 7], [NO_DOCUMENT, 10, 10, 10]),
        ([2, 1, 8, 1], [NO_DOCUMENT, 10, 11, 11]),  # a separator belongs to the document it ends
        ([2, 9, 9, 9], [NO_DOCUMENT, 12, 12, 12]),
    ]


# ---------------------------------------------------------------- the cache and eval


def test_the_manifest_records_each_shards_documents_and_the_held_out_ones(lm, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    expected = expected_shard_documents(lm[2])
    assert len(manifest["shards"]) == len(expected) == 4
    for shard, docs in zip(manifest["shards"], expected, strict=True):
        assert shard["documents"] == to_ranges(docs)
    held = expected[-1] - set().union(*expected[:-1])  # wholly inside the last shard
    assert manifest["held_out"] == {"shard": 3, "documents": to_ranges(held)}
    assert 10 < len(held) < len(expected[-1])  # the first document there started before it


def test_eval_with_the_cache_uses_exactly_its_held_out_documents(
    lm, cache, cache_sae, tmp_path, capsys
):
    report, err = evaluate(
        ["--sae", str(cache_sae), "--cache", str(cache), *model_args(lm, False)], tmp_path, capsys
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert report["document_ranges"] == manifest["held_out"]["documents"]
    assert report["documents"] == count(manifest["held_out"]["documents"])
    assert report["training_documents_evaluated"] == 0 and "warning" not in err
    assert "ce_score" in report
    # the SAE's cfg.json names what it trained on; --split heldout reads that record
    training = SAE.load(cache_sae).cfg.metadata["training_data"]
    assert training["documents"] == union(*(s["documents"] for s in manifest["shards"][:3]))
    again, _ = evaluate(
        ["--sae", str(cache_sae), "--split", "heldout", *model_args(lm, False)], tmp_path, capsys
    )
    assert again["document_ranges"] == report["document_ranges"]
    assert again["ce_sae"] == pytest.approx(report["ce_sae"])


def test_eval_on_the_training_text_warns_with_the_overlap(lm, cache, cache_sae, tmp_path, capsys):
    report, err = evaluate(
        ["--sae", str(cache_sae), *model_args(lm), "--batch-size", "32"], tmp_path, capsys
    )
    training = SAE.load(cache_sae).cfg.metadata["training_data"]["documents"]
    overlap = count(intersect(report["document_ranges"], training))
    assert report["document_ranges"] == [[0, 150]]  # the whole file, so every training document
    assert overlap == count(training) > 50
    assert report["training_documents_evaluated"] == overlap
    assert (
        f"warning: {overlap} of the {report['documents']} evaluated documents are training" in err
    )


def test_an_online_run_holds_out_its_leading_documents_for_eval(lm, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        *model_args(lm),
        "--model-batch-size",
        "4",
        *SMALL_RUN_ARGS,
        *TINY_SAE_ARGS,
        "--out",
        str(out),
    ]
    assert main([*argv, "--set", "data.shuffle_buffer_tokens=512"]) == 0
    sae = out / "topk-k4-M64"
    report, err = evaluate(
        ["--sae", str(sae), "--split", "heldout", *model_args(lm, False)], tmp_path, capsys
    )
    lengths = lm[2]
    n_held = next(i + 1 for i in range(len(lengths)) if sum(lengths[: i + 1]) >= 256 + CONTEXT)
    assert report["document_ranges"] == [[0, n_held]]
    assert report["training_documents_evaluated"] == 0 and "warning" not in err
    report, err = evaluate(
        ["--sae", str(sae), *model_args(lm), "--batch-size", "32"], tmp_path, capsys
    )
    assert report["training_documents_evaluated"] == report["documents"] - n_held > 0
    assert "training documents of this SAE" in err


# ---------------------------------------------------------------- report (issue 28)


def report_json(argv, tmp_path, capsys):
    out = tmp_path / "site"
    flags = ["--latents", "4", "--top-k", "2", "--samples", "4", "--batch-size", "32"]
    assert main(["report", *argv, *flags, "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    return summary, capsys.readouterr().err


def test_report_on_the_training_text_warns_and_reads_the_held_out_documents_on_request(
    lm, cache, cache_sae, tmp_path, capsys
):
    training = SAE.load(cache_sae).cfg.metadata["training_data"]["documents"]
    report, err = report_json([str(cache_sae), *model_args(lm)], tmp_path, capsys)
    overlap = count(intersect(report["document_ranges"], training))
    assert overlap > 50 and report["training_documents_read"] == overlap
    assert f"warning: {overlap} of the {report['documents']} read documents are training" in err
    assert "report on the held-out documents with --split heldout" in err
    held, err = report_json(
        [str(cache_sae), "--split", "heldout", *model_args(lm, False)], tmp_path, capsys
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert held["document_ranges"] == manifest["held_out"]["documents"]
    assert held["training_documents_read"] == 0 and "warning" not in err
    assert held["documents_from"] == "held out by its training"
    assert main(["report", str(cache_sae), "--split", "heldout", *model_args(lm)]) != 0
    assert "drop --dataset/--text-file" in capsys.readouterr().err
