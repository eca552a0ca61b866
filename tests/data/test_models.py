"""Models as researchers meet them: GPT-2, Llama and BERT families, hook discovery without weights,
encoder models and tokenizers without BOS/EOS (issue 18). Every model is a tiny random one built
from a config and saved locally (no network)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import (
    SMALL_RUN_ARGS,
    TINY_BOS,
    TINY_SAE_ARGS,
    make_tiny_bert,
    make_tiny_gpt2,
    make_tiny_llama,
)

from saekit.cli import main
from saekit.data.lm.harvester import TokenFilter
from saekit.data.lm.models import load_config, model_kind
from saekit.data.lm.text import packing_token_ids, token_batches


def write_docs(path, n_docs=150, seed=0):
    rng = random.Random(seed)
    docs = (
        " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 40)))
        for _ in range(n_docs)
    )
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def configs_only(tmp_path_factory):
    """Directories holding nothing but config.json: listing and checking hooks needs no weights."""
    root = tmp_path_factory.mktemp("configs")
    models = {"gpt2": make_tiny_gpt2(), "llama": make_tiny_llama(), "bert": make_tiny_bert()}
    for name, model in models.items():
        model.config.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("bert")
    make_tiny_bert().save_pretrained(root / "bert")
    bert_tokenizer.save_pretrained(root / "bert")
    return root / "bert", write_docs(root / "docs.txt")


def hook_lines(capsys) -> dict[str, str]:
    """{module: the rest of its line} from `saekit hooks` output."""
    rows = capsys.readouterr().out.splitlines()[2:]  # a sentence, then the column titles
    return {row.split()[0]: " ".join(row.split()[1:]) for row in rows}


# ---------------------------------------------------------------- saekit hooks


def test_hooks_lists_gpt2_points_with_shapes_from_the_config_alone(configs_only, capsys):
    assert main(["hooks", str(configs_only / "gpt2"), "--local-files-only"]) == 0
    lines = hook_lines(capsys)
    assert lines["transformer.wte"] == "[B, T, 64] [B, T]"  # ids in, embeddings out
    assert lines["transformer.h.1"] == "[B, T, 64] [B, T, 64]"
    assert lines["transformer.h.0.mlp.c_fc"] == "[B, T, 256] [B, T, 64]"  # 4·d
    assert lines["lm_head"] == "[B, T, 300] [B, T, 64]"  # the vocabulary
    assert set(lines) == {name for name, _ in make_tiny_gpt2().named_modules() if name}
    assert lines["transformer.h"] == "- -"  # a ModuleList is never called


def test_hooks_lists_llama_points_and_greps(configs_only, capsys):
    assert main(["hooks", str(configs_only / "llama"), "--grep", r"layers\.1\.self_attn\."]) == 0
    lines = hook_lines(capsys)
    assert set(lines) == {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"}
    assert lines["model.layers.1.self_attn.k_proj"] == "[B, T, 32] [B, T, 64]"  # 2 of 4 heads


def test_hooks_lists_bert_points_for_the_masked_lm_and_the_bare_encoder(configs_only, capsys):
    assert main(["hooks", str(configs_only / "bert"), "--grep", r"layer\.1$"]) == 0
    out = capsys.readouterr().out
    assert "BertForMaskedLM (masked-lm)" in out
    assert "bert.encoder.layer.1  [B, T, 64]  [B, T, 64]" in out
    argv = ["hooks", str(configs_only / "bert"), "--model-class", "encoder", "--grep", "layer.1$"]
    assert main(argv) == 0
    assert hook_lines(capsys) == {"encoder.layer.1": "[B, T, 64] [B, T, 64]"}


def test_a_gpt2_hook_name_on_llama_suggests_its_family_before_any_weights(configs_only, capsys):
    # the directory has no weights and no tokenizer: only the hook check can have run
    argv = ["cache", "--model", str(configs_only / "llama"), "--text-file", "x.txt"]
    for hook, guess in (
        ("transformer.h.1:input", "did you mean model.layers.1?"),
        ("transformer.h.1.mlp", "did you mean model.layers.1.mlp?"),
        ("transformer.h.1.attn", "did you mean model.layers.1 (its parts: self_attn, mlp"),
    ):
        assert main([*argv, "--hook", hook, "--out", "c", "--local-files-only"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "blocks are model.layers.0 to model.layers.1, not transformer.h.N" in line
        assert guess in line


def test_model_kind_from_the_saved_class_or_the_model_type(configs_only):
    gpt2, llama, bert = (load_config(str(configs_only / n)) for n in ("gpt2", "llama", "bert"))
    assert [model_kind(c) for c in (gpt2, llama, bert)] == ["causal-lm", "causal-lm", "masked-lm"]
    bert.architectures = ["BertModel"]
    assert model_kind(bert) == "encoder"
    bert.architectures = None  # transformers knows a causal BERT too: masked wins
    llama.architectures = None
    assert (model_kind(bert), model_kind(llama)) == ("masked-lm", "causal-lm")
    assert model_kind(bert, "causal-lm") == "causal-lm"


# ---------------------------------------------------------------- packing without BOS/EOS


def test_bert_tokenizer_packs_cls_and_sep_or_named_tokens_or_none(bert_tokenizer):
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert packing_token_ids(bert_tokenizer) == (cls, sep)
    assert packing_token_ids(bert_tokenizer, "[MASK]", "none") == (4, None)
    with pytest.raises(ValueError, match="--eos-token 'nope' is not a token"):
        packing_token_ids(bert_tokenizer, eos_token="nope")
    docs = ["w1 w2 w3", "w4 w5"]
    kw = {"context_length": 4, "batch_size": 8}
    assert token_batches(docs, bert_tokenizer, **kw).__next__().tolist() == [
        [cls, 6, 7, 8],
        [cls, sep, 9, 10],
    ]
    plain = token_batches(docs, bert_tokenizer, bos_token="none", eos_token="none", **kw)
    assert next(plain).tolist() == [[6, 7, 8, 9]]
    # [CLS] leads every context and is dropped like BOS: the filter takes the packing's BOS id
    ids = torch.tensor([[cls, 6, sep, 7]])
    keep = TokenFilter.from_tokenizer(bert_tokenizer, bos_token_id=cls).mask(ids)
    assert keep.tolist() == [[False, True, True, True]]


def test_a_tokenizer_without_any_boundary_token_names_the_flags(tiny_tokenizer):
    assert packing_token_ids(tiny_tokenizer) == (TINY_BOS, TINY_BOS)  # GPT-2 style: one token
    bare = type("Bare", (), {})()  # no bos/eos/cls/sep ids at all
    with pytest.raises(ValueError, match="no BOS/EOS/CLS token .*--bos-token TOKEN.*none"):
        packing_token_ids(bare)


# ---------------------------------------------------------------- an encoder end to end


def test_an_encoder_model_trains_from_the_cli_and_evaluates_without_ce(bert_dir, tmp_path, capsys):
    model, docs = bert_dir
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--hook", "bert.encoder.layer.1"]
    argv += ["--text-file", str(docs), "--local-files-only", "--context-length", "16"]
    argv += ["--model-batch-size", "4", "--set", "data.shuffle_buffer_tokens=512"]
    assert main([*argv, *SMALL_RUN_ARGS, *TINY_SAE_ARGS, "--out", str(out)]) == 0
    report = json.loads((out / "topk-k4-M64" / "eval.json").read_text())
    assert report["n_tokens"] == 256 and report["l0"] == pytest.approx(4.0)
    capsys.readouterr()
    argv = ["eval", "--sae", str(out / "topk-k4-M64"), "--model", str(model)]
    argv += ["--text-file", str(docs), "--local-files-only", "--context-length", "16"]
    assert main([*argv, "--n-batches", "2", "--json", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    assert "loads as masked-lm: reconstruction metrics only" in captured.err
    assert "CE" not in captured.out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["model_class"] == "masked-lm"
    assert report["n_tokens"] == 2 * 8 * 15  # 2 batches of 8 contexts; [CLS] not evaluated
