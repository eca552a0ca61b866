"""Model diffing: several models run on the same tokens (saekit.data.lm.model_set, data.models,
``saekit cache --models``).

Two tiny random Llamas built from a config: ``base`` and ``ft``, a copy of it whose layer-1 MLP
down-projection is perturbed, so their block-0 outputs are equal and their block-1 outputs differ.
The two-model stream must hold, column for column, exactly what each model gives alone on the
same tokens: against each model's own one-model source (bit for bit, shuffled training stream
and held-out stream) and against the model's float64 forward (``output_hidden_states``, no hooks).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil

import pytest
import torch
from conftest import TINY_BOS, make_tiny_llama
from test_sources import write_documents
from transformers import LlamaForCausalLM

from saekit.cli import main
from saekit.data.cache.reading import ActivationCache, CacheError
from saekit.data.cache.writing import write_cache
from saekit.data.documents.reading import documents
from saekit.data.hook_columns import split_hooks
from saekit.data.lm.harvester import unpack_batch
from saekit.data.lm.model_set import describe_models, parse_model_specs
from saekit.data.lm.text import token_batches
from saekit.data.sources.interface import StreamSettings
from saekit.data.sources.registry import source_config

L0, L1 = "model.layers.0", "model.layers.1"
SETTINGS = StreamSettings(batch_size=64, seed=3, eval_tokens=128)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer, bert_tokenizer):
    """(base dir, ft dir, other-tokenizer dir, documents): ft = base with layer 1's MLP changed;
    other = base saved with a BERT-style tokenizer (another vocabulary)."""
    root = tmp_path_factory.mktemp("pair")
    base = make_tiny_llama(seed=2, n_layer=3)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        w = ft.model.layers[1].mlp.down_proj.weight
        w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
    for name, model, tokenizer in (
        ("base", base, tiny_tokenizer),
        ("ft", ft, tiny_tokenizer),
        ("other", base, bert_tokenizer),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    docs = write_documents(root / "docs.txt", n_docs=200)
    return root / "base", root / "ft", root / "other", docs


def hf(docs, **fields):
    data = {"source": "hf", "text_file": str(docs), "local_files_only": True}
    data.update(context_length=16, model_batch_size=8, shuffle_buffer_tokens=256)
    return source_config({**data, **fields})


def both(base, ft):
    return {"base": str(base), "ft": str(ft)}


def test_the_two_model_stream_is_what_each_model_gives_alone(pair, one_thread):
    base, ft, _, docs = pair
    hooks = [f"base/{L0}", f"base/{L1}", f"ft/{L0}", f"ft/{L1}"]
    two = hf(docs, models=both(base, ft), input_hooks=hooks).build(SETTINGS)
    alone = [hf(docs, model=str(m), input_hooks=[L0, L1]).build(SETTINGS) for m in (base, ft)]
    assert two.d == 256 and two.n_eval_docs == alone[0].n_eval_docs > 0
    # the shuffled training stream and the held-out stream, column for column, bit for bit
    streams = [itertools.islice(s.batches(), 4) for s in (two, *alone)]
    evals = [(x for x, _ in s.eval_batches(128, 64)) for s in (two, *alone)]
    for rows, rows_base, rows_ft in itertools.chain(
        zip(*streams, strict=True), zip(*evals, strict=True)
    ):
        assert torch.equal(rows[:, :128], rows_base) and torch.equal(rows[:, 128:], rows_ft)
    # against each model's own float64 forward on the leading documents (held out, in order)
    contexts = token_batches(documents(text_file=str(docs)), two.tokenizer, context_length=16,
                             batch_size=8)  # fmt: skip
    ids = torch.cat([unpack_batch(b)[0] for b in itertools.islice(contexts, 2)])
    keep = ids != TINY_BOS  # the BOS position of each context is dropped
    refs = []
    for path in (base, ft):
        model = LlamaForCausalLM.from_pretrained(path).double()
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states
        refs += [states[1][keep], states[2][keep]]  # block 0's and block 1's outputs
    ref = torch.cat(refs, dim=-1)[:128]
    got = torch.cat([x for x, _ in two.eval_batches(128, 64)]).double()
    assert got.shape == ref.shape == (128, 256)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the models are two: block 0 is shared, block 1 differs (ft's changed MLP)
    assert torch.equal(got[:, :64], got[:, 128:192])
    assert (got[:, 64:128] - got[:, 192:]).norm(dim=1).mean() > 0.3 * got[:, 64:128].norm(
        dim=1
    ).mean()


def cache_argv(out, *model_flags, hooks=(f"base/{L1}", f"ft/{L1}"), docs="docs"):
    argv = ["cache", *model_flags, "--local-files-only", "--hooks", *hooks, "--text-file", docs]
    argv += ["--context-length", "16", "--batch-size", "8", "--shard-tokens", "256"]
    return [*argv, "--max-tokens", "1100", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def caches(pair, tmp_path_factory):
    """`saekit cache --models base=B ft=F` of both models' block 1, and each model's own cache."""
    base, ft, _, docs = pair
    root = tmp_path_factory.mktemp("caches")
    models = ["--models", f"base={base}", f"ft={ft}"]
    assert main(cache_argv(root / "two", *models, docs=str(docs))) == 0
    for name, path in (("base", base), ("ft", ft)):
        argv = cache_argv(root / name, "--model", str(path), hooks=[L1], docs=str(docs))
        assert main(argv) == 0
    return root


def test_a_two_model_cache_holds_each_models_cache_and_names_the_models(pair, caches, capsys):
    base, ft, _, _ = pair
    two, alone = ActivationCache(caches / "two"), ActivationCache(caches / "base")
    assert two.manifest["models"] == both(base, ft) and two.model == f"base={base}, ft={ft}"
    assert two.hooks == [(f"base/{L1}", 64), (f"ft/{L1}", 64)] and two.d == 128
    manifest = json.loads((caches / "two" / "manifest.json").read_text())
    assert manifest["held_out"] == alone.manifest["held_out"]  # the same documents held out
    assert [s.documents for s in two.shards] == [s.documents for s in alone.shards]
    for s in range(len(two.shards)):
        parts = split_hooks(two.load_shard(s), two.hooks)
        assert torch.equal(parts[f"base/{L1}"], alone.load_shard(s))
        assert torch.equal(parts[f"ft/{L1}"], ActivationCache(caches / "ft").load_shard(s))
    assert main(["cache", "verify", str(caches / "two")]) == 0
    out = capsys.readouterr().out
    assert f"model base={base}, ft={ft}, hook(s) base/{L1} (64), ft/{L1} (64); verified" in out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["hooks"][1].update(name=f"chat/{L1}"),
         f"hooks.1: 'chat/{L1}' names model 'chat', not one of \\['base', 'ft'\\]"),
        (lambda m: m.pop("models"), f"hooks.0: 'base/{L1}' names model 'base', but no model set"),
        (lambda m: m["models"].pop("ft"), "models names the models run on the same tokens"),
        (lambda m: m["hooks"][0].update(name=L1), f"hooks.0: '{L1}' names no model"),
    ],
)  # fmt: skip
def test_verify_refuses_a_manifest_whose_hooks_and_models_disagree(
    caches, tmp_path, capsys, edit, message
):
    shutil.copytree(caches / "two", tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    assert main(["cache", "verify", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_write_cache_records_the_models_and_resumes_only_with_them(tmp_path):
    batches = [{"a/h": torch.ones(5, 2), "b/h": torch.zeros(5, 3)}] * 3
    models = {"a": "m1", "b": "m2"}
    write_cache(tmp_path / "c", batches, ["a/h", "b/h"], describe_models(models), models=models)
    assert ActivationCache(tmp_path / "c").manifest["models"] == models
    with pytest.raises(CacheError, match="different settings.*models"):
        write_cache(
            tmp_path / "c", batches, ["a/h", "b/h"], "a=m1, b=m2", models={"a": "m1", "b": "m3"}
        )
    with pytest.raises(ValueError, match="'c/h' names model 'c', not one of"):
        write_cache(tmp_path / "d", batches, ["a/h", "c/h"], "x", models=models)


# ------------------------------------------------------------------------------ refusals

BAD = [
    ({"model": "M", "models": {"a": "A", "b": "B"}},
     r"^set data.model \(one model\) or data.models \(several\), not both$"),
    ({"models": {"a": "A"}}, r"^data.models names the models run on the same tokens by label, at"),
    ({"models": {"a b": "A", "c": "B"}}, r"^data.models: label 'a b' must be letters"),
    ({"models": {"a": "A", "b": ""}}, r"^data.models.b: expected a model hub id or directory"),
    ({"models": {"a": "A", "b": "B"}, "input_hooks": [L1]},
     rf"^data.input_hooks: '{L1}' names no model; with several models name hooks LABEL/HOOK,"
     rf" e.g. 'a/{L1}' \(labels: a, b\)$"),
    ({"models": {"a": "A", "b": "B"}, "hooks": [f"a/{L1}", f"c/{L1}"], "hook": f"a/{L1}"},
     rf"^data.hooks: 'c/{L1}' names model 'c', not one of \['a', 'b'\]$"),
    ({"model": "M", "hook": f"a/{L1}"},
     rf"^data.hook: 'a/{L1}' names model 'a', but no model set is given"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_a_model_set_that_cannot_work_is_refused_in_one_line(fields, message, tmp_path):
    docs = write_documents(tmp_path / "docs.txt", n_docs=3)
    data = (
        {"hook": L1, **fields} if "hooks" not in fields and "input_hooks" not in fields else fields
    )
    with pytest.raises(ValueError, match=message) as info:
        hf(docs, **data)
    assert "\n" not in str(info.value)


def test_models_with_another_vocabulary_or_without_a_hook_are_refused(pair, tmp_path, capsys):
    base, ft, other, docs = pair
    with pytest.raises(ValueError, match="^data.models: no hook of model 'ft' is harvested"):
        hf(docs, models=both(base, ft), input_hooks=[f"base/{L1}"]).build(SETTINGS)
    with pytest.raises(
        ValueError, match=r"^model 'other' \(.*\) has another tokenizer than 'base'"
    ):
        hf(docs, models={"base": str(base), "other": str(other)}, hook=f"base/{L1}",
           hooks=[f"base/{L1}", f"other/{L1}"]).build(SETTINGS)  # fmt: skip
    for flags, message in (
        (["--models", f"base={base}"], "--models names the models run on the same tokens"),
        (["--models", "base", f"ft={ft}"], "--models 'base': expected LABEL=MODEL"),
        (["--models", f"base={base}", f"other={other}"], "has another tokenizer than 'base'"),
    ):
        hooks = [f"{spec.split('=')[0]}/{L1}" for spec in flags[1:]]
        assert main(cache_argv(tmp_path / "c", *flags, hooks=hooks, docs=str(docs))) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_model_specs_keep_their_order_and_refuse_a_label_twice():
    assert list(parse_model_specs(["z=1", "a=2"])) == ["z", "a"]
    with pytest.raises(ValueError, match="label 'z' is given twice"):
        parse_model_specs(["z=1", "z=2"])
