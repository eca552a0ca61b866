"""Cross-layer transcoders and crosscoders in runs: the trainer, Member and objective take them as
they take an SAE. A 1-layer CLT trains as a transcoder and a 1-source crosscoder as an SAE, step
for step and bit for bit; a 3-layer CLT of a tiny random Llama (built from a config) trains from
the model online and from a multi-hook cache, with ``saekit train --config``, and resumes
exactly; the data selects the hooks (data.input_hooks, data.target_hooks) and the run config
names the architecture (``sae: {kind: clt}``, ``{kind: crosscoder}``).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_tiny_llama
from test_sources import write_documents
from test_trainer import interrupt_at

from saekit.cli import main
from saekit.model.clt import CLTConfig, CrossLayerTranscoder
from saekit.model.crosscoder import Crosscoder
from saekit.model.dictionary import load_dictionary
from saekit.train.config import build_run_config, make_source
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig
from saekit.train.run import run_training
from saekit.train.trainer import Trainer, TrainingInterrupted

L = 3
INPUTS = [f"model.layers.{layer}.mlp:input" for layer in range(L)]
TARGETS = [f"model.layers.{layer}.mlp" for layer in range(L)]
RESID = [f"model.layers.{layer}" for layer in range(L)]


# ------------------------------------------------------------- one layer, one source: exactly


def trajectory(train_cfg, batches):
    member = Member(train_cfg, total_steps=len(batches), device="cpu")
    member.init_from_data(torch.cat(batches))
    steps = [member.train_step(b, i).as_dict() for i, b in enumerate(batches)]
    state = {k.removesuffix(".0"): v for k, v in member.sae.state_dict().items()}
    return steps, state, member


TRAIN = {"lr": 3e-3, "warmup_steps": 2, "seed": 4}
KINDS = {
    "topk": {"sae": {"activation": {"kind": "topk", "k": 3}}},
    "batchtopk": {"sae": {"activation": {"kind": "batchtopk", "k": 3}}},
    "jumprelu": {
        "sae": {"activation": "jumprelu"},
        "penalty": {"kind": "l0", "coefficient": 0.05, "target_l0": 4.0},
    },
    "relu": {"sae": {"activation": "relu"}, "penalty": {"kind": "l1", "coefficient": 0.02}},
}


def batches(width, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g)
    return [torch.relu(torch.randn(64, width, generator=g)) @ mix + 0.5 for _ in range(n)]


@pytest.mark.parametrize("dead_tokens", [10**9, 64], ids=["none-dead", "some-dead"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_one_layer_clt_trains_as_a_transcoder_step_for_step(kind, dead_tokens, one_thread):
    """Same seed, same batches: the same metrics and parameters after every step (AuxK over
    dead latents: equal to float rounding, its decode being summed in another order)."""
    spec, d_in, d_out = KINDS[kind], 6, 5
    sae = {"d_in": d_in, "d_sae": 16, "d_out": d_out, **spec["sae"]}
    common = {**TRAIN, "dead_tokens": dead_tokens, "penalty": spec.get("penalty")}
    tc_cfg = SAETrainConfig(sae=sae, **common)
    clt_cfg = SAETrainConfig(sae={**sae, "kind": "clt", "n_layers": 1}, **common)
    data = batches(d_in + d_out)
    steps_t, state_t, _ = trajectory(tc_cfg, data)
    steps_c, state_c, member = trajectory(clt_cfg, data)
    assert isinstance(member.sae, CrossLayerTranscoder)
    exact = dead_tokens > 10**6 or kind not in ("topk", "batchtopk")
    if kind in ("topk", "batchtopk") and not exact:
        assert any(float(s["revival"]) > 0 for s in steps_t)
    for a, b in zip(steps_t, steps_c, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if exact:
                assert torch.equal(a[key], b[key]), key
            else:
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert state_t.keys() == state_c.keys()
    for key, value in state_t.items():
        got = state_c[key].view(value.shape)
        if exact:
            assert torch.equal(value, got), key
        else:
            torch.testing.assert_close(value, got, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_one_source_crosscoder_trains_as_an_sae_bit_for_bit(kind, one_thread):
    spec = KINDS[kind]
    sae = {"d_in": 8, "d_sae": 16, **spec["sae"]}
    common = {**TRAIN, "dead_tokens": 64, "penalty": spec.get("penalty")}
    data = batches(8)
    steps_s, state_s, _ = trajectory(SAETrainConfig(sae=sae, **common), data)
    cc_cfg = SAETrainConfig(sae={**sae, "kind": "crosscoder", "n_sources": 1}, **common)
    steps_c, state_c, member = trajectory(cc_cfg, data)
    assert isinstance(member.sae, Crosscoder)
    for a, b in zip(steps_s, steps_c, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key, value in state_s.items():
        assert torch.equal(value, state_c[key].view(value.shape)), key


def test_a_three_layer_clt_and_crosscoder_learn_on_a_paired_stream(one_thread):
    """Every kind that fits, through Member: the loss falls within 60 steps."""
    d = 6
    data = batches(2 * L * d, n=60, seed=1)
    for extra in (
        {"kind": "clt", "n_layers": L, "activation": {"kind": "topk", "k": 2}},
        {"kind": "clt", "n_layers": L, "activation": {"kind": "batchtopk", "k": 6}},
        {"kind": "clt", "n_layers": L, "activation": "jumprelu"},
        {"kind": "crosscoder", "n_sources": 2 * L, "activation": {"kind": "topk", "k": 4}},
    ):
        penalty = (
            {"kind": "tanh", "coefficient": 0.01} if extra["activation"] == "jumprelu" else None
        )
        cfg = SAETrainConfig(sae={"d_in": d, "d_sae": 12, **extra}, lr=1e-2, penalty=penalty)
        member = Member(cfg, total_steps=60, device="cpu")
        member.init_from_data(torch.cat(data))
        losses = [float(member.train_step(b, i).loss) for i, b in enumerate(data)]
        assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), (extra, losses[:3], losses[-3:])


# ------------------------------------------------------------------- a tiny Llama, 3 layers


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("lm") / "tiny-llama"
    make_tiny_llama(seed=2, n_layer=L).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_documents(tmp_path_factory.mktemp("docs") / "docs.txt", n_docs=200)


@pytest.fixture(scope="module")
def cache_dir(llama_dir, docs, tmp_path_factory):
    """`saekit cache --hooks` of every layer's MLP input, MLP output and block output."""
    out = tmp_path_factory.mktemp("cache") / "c"
    argv = ["cache", "--model", str(llama_dir), "--local-files-only", "--hooks"]
    argv += [*INPUTS, *TARGETS, *RESID, "--text-file", str(docs), "--context-length", "16"]
    argv += ["--batch-size", "8", "--shard-tokens", "512", "--max-tokens", "2600"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    return out


CLT_ENTRY = {
    "name": "clt",
    "sae": {"kind": "clt", "d_sae": 48, "activation": {"kind": "topk", "k": 4}},
    "lr": 1e-2,
    "warmup_steps": 2,
    "dead_tokens": 2000,
}
BATCHTOPK = {"kind": "batchtopk", "k": 12}  # across all layers: 12 per token on average
CLT_BATCHTOPK = {
    **CLT_ENTRY,
    "name": "clt-batchtopk",
    "sae": {"kind": "clt", "d_sae": 48, "activation": BATCHTOPK},
}


def run_dict(tmp_path, data, saes, steps=40, **extra):
    return {
        "data": data,
        "saes": saes,
        "batch_size": 64,
        "steps": steps,
        "eval_tokens": 128,
        "log_every": 5,
        "checkpoint_every": 0,
        "progress": False,
        "out_dir": str(tmp_path / "run"),
        **extra,
    }


def logged_losses(run_dir, name):
    lines = (run_dir / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_a_three_layer_clt_trains_from_a_multi_hook_cache_and_resumes_exactly(
    cache_dir, tmp_path, one_thread
):
    data = {"source": "cache", "cache_dir": str(cache_dir), "shuffle_buffer_tokens": 256,
            "input_hooks": INPUTS, "target_hooks": TARGETS}  # fmt: skip
    crosscoder = {"name": "cc", "lr": 1e-2, "sae": {"kind": "crosscoder", "d_sae": 48,
                  "activation": {"kind": "batchtopk", "k": 8}}}  # fmt: skip
    whole = build_run_config(run_dict(tmp_path / "a", data, [CLT_ENTRY, CLT_BATCHTOPK]))
    sae = whole.saes[0].sae
    assert isinstance(sae, CLTConfig) and (sae.n_layers, sae.d_in, sae.d_out) == (L, 64, 64)
    assert sae.hooks == INPUTS and sae.target_hooks == TARGETS
    trainer, _ = run_training(whole)
    losses = logged_losses(tmp_path / "a" / "run", "clt")
    assert losses[-1] < 0.6 * losses[0], losses
    clt = load_dictionary(tmp_path / "a" / "run" / "clt")
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.hooks == INPUTS
    report = json.loads((tmp_path / "a" / "run" / "clt" / "eval.json").read_text())
    assert 0 < report["fvu"] < 1
    # BatchTopK across every layer: trained, its θ calibrated on held-out tokens, saved with it
    batchtopk = json.loads((tmp_path / "a" / "run" / "clt-batchtopk" / "eval.json").read_text())
    assert 0 < batchtopk["fvu"] < 1 and batchtopk["threshold"] > 0
    saved = load_dictionary(tmp_path / "a" / "run" / "clt-batchtopk")
    assert float(saved.activation.threshold) == pytest.approx(batchtopk["threshold"])

    # interrupted (SIGINT) at step 20 and resumed: the same state and log as the whole run
    cut = build_run_config(run_dict(tmp_path / "b", data, [CLT_ENTRY, CLT_BATCHTOPK]))
    first = Trainer(cut, make_source(cut))
    interrupt_at(first, 20)
    with pytest.raises(TrainingInterrupted, match="resume with"):
        first.fit()
    resumed = Trainer(cut, make_source(cut))
    resumed.load_checkpoint()
    assert resumed.step == 20
    resumed.fit()
    assert logged_losses(tmp_path / "b" / "run", "clt") == losses
    for whole_member, resumed_member in zip(trainer.members, resumed.members, strict=True):
        state, again = whole_member.state_tensors(), resumed_member.state_tensors()
        assert state.keys() == again.keys()
        for key, value in state.items():
            assert torch.equal(value, again[key]), key

    # a crosscoder over the three block outputs of the same cache
    cc_data = {**data, "input_hooks": RESID, "target_hooks": None}
    cc_cfg = build_run_config(run_dict(tmp_path / "c", cc_data, [crosscoder]))
    assert cc_cfg.saes[0].sae.n_sources == L and cc_cfg.saes[0].sae.hooks == RESID
    run_training(cc_cfg)
    losses = logged_losses(tmp_path / "c" / "run", "cc")
    assert losses[-1] < 0.6 * losses[0], losses
    assert load_dictionary(tmp_path / "c" / "run" / "cc").decoder_norms_by_target().shape == (
        48,
        L,
    )


def test_a_three_layer_clt_trains_from_the_model_online_with_a_config_file(
    llama_dir, docs, tmp_path, one_thread
):
    data = {"source": "hf", "model": str(llama_dir), "text_file": str(docs),
            "local_files_only": True, "context_length": 16, "model_batch_size": 8,
            "shuffle_buffer_tokens": 256, "input_hooks": INPUTS,
            "target_hooks": TARGETS}  # fmt: skip
    config = tmp_path / "clt.yaml"
    config.write_text(yaml.safe_dump(run_dict(tmp_path, data, [CLT_ENTRY], steps=30)))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    losses = logged_losses(tmp_path / "run", "clt")
    assert losses[-1] < 0.6 * losses[0], losses
    clt = load_dictionary(tmp_path / "run" / "clt")
    assert clt.cfg.target_hooks == TARGETS and clt.cfg.model_name == str(llama_dir)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["saes"][0]["sae"]["kind"] == "clt" and saved["data"]["input_hooks"] == INPUTS


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("data", "sae", "message"),
    [
        ({"input_hooks": INPUTS}, {"kind": "clt"},
         "saes.0.sae.kind 'clt' needs data.target_hooks, one per data.input_hooks"),
        ({"input_hooks": RESID, "target_hooks": TARGETS}, {"kind": "crosscoder"},
         "saes.0.sae.kind 'crosscoder' needs data.input_hooks alone"),
        ({"input_hooks": INPUTS, "target_hooks": TARGETS}, {},
         "saes.0.sae: an SAE or transcoder reads one hook .* set saes.0.sae.kind to clt"),
        ({"input_hooks": INPUTS, "target_hooks": TARGETS[:2]}, {"kind": "clt"},
         "data.target_hooks names 2 hooks and data.input_hooks 3"),
        ({"input_hooks": INPUTS, "target_hooks": TARGETS}, {"kind": "clt", "n_layers": 2},
         r"saes.0.sae.n_layers = 2 but the data gives 3"),
        ({"input_hooks": INPUTS, "hook": INPUTS[0]}, {"kind": "crosscoder"},
         r"set data.input_hooks \(\+ data.target_hooks\) or data.hook"),
        ({"input_hooks": [INPUTS[0], "model.layers.9.mlp"]}, {"kind": "crosscoder"},
         "data.input_hooks: 'model.layers.9.mlp' is not one of the hooks"),
    ],
)  # fmt: skip
def test_selections_that_do_not_fit_the_dictionary_are_refused(cache_dir, data, sae, message):
    cfg = {"source": "cache", "cache_dir": str(cache_dir), **data}
    entry = {"sae": {"d_sae": 8, "activation": {"kind": "topk", "k": 2}, **sae}}
    with pytest.raises(ValueError, match=message):
        build_run_config({"data": cfg, "saes": [entry]})


def test_matryoshka_and_synthetic_data_are_refused_for_a_clt(cache_dir):
    data = {"source": "cache", "cache_dir": str(cache_dir), "input_hooks": INPUTS,
            "target_hooks": TARGETS}  # fmt: skip
    entry = {"sae": {"kind": "clt", "d_sae": 8, "activation": {"kind": "topk", "k": 2}},
             "matryoshka": {"kind": "fixed", "groups": [4, 20]}}  # fmt: skip
    with pytest.raises(ValueError, match="matryoshka does not apply to sae.kind 'clt'"):
        build_run_config({"data": data, "saes": [entry]})
    del entry["matryoshka"]
    with pytest.raises(ValueError, match="kind 'clt' reads named hooks of a model"):
        build_run_config({"data": {"source": "synthetic"}, "saes": [entry]})
