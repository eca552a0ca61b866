"""Transcoders on a language model: the MLP of a tiny random Llama (built from a config).

Input ``model.layers.1.post_attention_layernorm`` (the MLP's input), target ``model.layers.1.mlp``
(its output): harvested in one forward pass, stopped after the MLP; the splice replaces the
MLP's output by the transcoder's prediction from the MLP's input of the same pass.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BOS, TINY_VOCAB, make_tiny_llama
from test_sources import write_documents
from torch import nn

from saekit.data.lm.harvester import TokenFilter
from saekit.eval.splice import splice_eval
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.train.config import build_run_config, make_source

IN_HOOK, OUT_HOOK = "model.layers.1.post_attention_layernorm", "model.layers.1.mlp"
ALL = TokenFilter(exclude_bos=False)  # splice every position


@pytest.fixture(scope="module")
def llama():
    """Layer 1's MLP (×20) and the unembedding (×30) scaled up from the random init, so the MLP
    matters and the model's own samples are predictable by it: on them CE_zero − CE_clean is
    large (an expected CE gap is the KL, E_p[−log q] = H(p) + KL(p‖q))."""
    model = make_tiny_llama()
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.mul_(20)
        model.lm_head.weight.mul_(30)
    return model


@torch.no_grad()
def model_samples(model, n, length=16, seed=0):
    """[n, length] token ids sampled from the model itself, BOS first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), TINY_BOS)
    for _ in range(length - 1):
        p = model(input_ids=ids, use_cache=False).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], dim=1)
    return ids


def token_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, TINY_VOCAB, (4, 12), generator=g) for _ in range(n)]


def random_transcoder(seed=0) -> SAE:
    cfg = SAEConfig(d_in=64, d_sae=128, activation={"kind": "topk", "k": 8}, d_out=64, skip=True)
    tc = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tc.scale.fill_(0.8)
        tc.target_scale.fill_(0.05)
    return tc


def test_splicing_the_mlp_itself_gives_the_clean_model(llama):
    mlp = copy.deepcopy(llama.model.layers[1].mlp)  # a copy: the original's output is hooked
    result = splice_eval(
        llama, OUT_HOOK, mlp, token_batches(), token_filter=ALL, input_hook=IN_HOOK
    )
    assert result.ce_sae == pytest.approx(result.ce_clean, abs=1e-6)
    assert abs(result.kl_sae) < 1e-9 and result.fvu < 1e-10
    assert result.kl_zero > 0 and result.n_spliced == 3 * 4 * 12


class Replaced(nn.Module):
    """The MLP replaced by a function of its input: the reference splice, in float64."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


def reference_losses(model, batches, fn):
    """(CE, KL(p_clean ‖ p_replaced)) token means, float64, over positions t < T − 1."""
    model = copy.deepcopy(model).double()
    clean_logits = [model(input_ids=ids, use_cache=False).logits for ids in batches]
    model.model.layers[1].mlp = Replaced(fn)
    ce = kl = n = 0.0
    for ids, clean in zip(batches, clean_logits, strict=True):
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1], -1)
        logp_clean = F.log_softmax(clean[:, :-1], -1)
        ce += float(-logp.gather(-1, ids[:, 1:, None]).sum().detach())
        kl += float((logp_clean.exp() * (logp_clean - logp)).sum().detach())
        n += ids[:, 1:].numel()
    return ce / n, kl / n


def test_splice_matches_a_float64_reference(llama):
    tc = random_transcoder()
    tc64 = copy.deepcopy(tc).double()
    batches = token_batches(2)
    result = splice_eval(
        llama, OUT_HOOK, lambda x: tc(x).x_hat, batches, token_filter=ALL, input_hook=IN_HOOK
    )
    ce, kl = reference_losses(llama, batches, lambda h: tc64(h).x_hat)
    ce_zero, kl_zero = reference_losses(llama, batches, torch.zeros_like)
    assert result.ce_sae == pytest.approx(ce, rel=1e-4)
    assert result.kl_sae == pytest.approx(kl, rel=1e-3)
    assert result.ce_zero == pytest.approx(ce_zero, rel=1e-4)
    assert result.kl_zero == pytest.approx(kl_zero, rel=1e-3)
    assert result.kl_sae > 1e-3  # the transcoder really changed the model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer, llama):
    path = tmp_path_factory.mktemp("lm") / "tiny-llama"
    llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def paired_config(llama_dir, tmp_path, saes, steps=6, **extra):
    return build_run_config(
        {
            "data": {
                "source": "hf",
                "model": str(llama_dir),
                "hook": IN_HOOK,
                "target_hook": OUT_HOOK,
                "text_file": str(write_documents(tmp_path / "docs.txt")),
                "context_length": 16,
                "model_batch_size": 8,
                "local_files_only": True,
                "shuffle_buffer_tokens": 512,
            },
            "saes": saes,
            "batch_size": 64,
            "steps": steps,
            "eval_tokens": 256,
            "log_every": 3,
            "checkpoint_every": 0,
            "progress": False,
            "out_dir": str(tmp_path / "run"),
            **extra,
        }
    )


SKIP_TOPK = {"sae": {"d_sae": 128, "activation": {"kind": "topk", "k": 8}, "skip": True}}


def test_online_pairs_are_input_then_target_of_the_same_token(llama_dir, tmp_path):
    """After the shuffle buffer, each row's target columns are the MLP of its input columns;
    the harvest stops after the MLP (the final norm never runs)."""
    cfg = paired_config(llama_dir, tmp_path, [SKIP_TOPK])
    sae_cfg = cfg.saes[0].sae
    assert (sae_cfg.d_in, sae_cfg.d_out, sae_cfg.stream_width) == (64, 64, 128)
    assert (sae_cfg.hook, sae_cfg.target_hook) == (IN_HOOK, OUT_HOOK)
    source = make_source(cfg)
    calls = []
    source.model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    batch = torch.cat(list(itertools.islice(source.batches(), 3)))
    assert batch.shape == (192, 128) and not calls
    with torch.no_grad():
        mlp_of_input = copy.deepcopy(source.model.model.layers[1].mlp)(batch[:, :64])
    torch.testing.assert_close(batch[:, 64:], mlp_of_input, rtol=1e-5, atol=1e-6)


def test_saekit_eval_scores_a_transcoder_on_its_target(llama_dir, tmp_path, capsys):
    """A transcoder that predicts 0 everywhere: spliced, it is exactly the zero-ablation of the
    MLP (CE and KL scores 0), and its FVU is the target's Σ‖y‖² / Σ‖y − ȳ‖² > 1."""
    import json

    from saekit.cli import main

    tc = random_transcoder()
    tc.cfg.hook, tc.cfg.target_hook = IN_HOOK, OUT_HOOK
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.zero_()
        tc.W_skip.zero_()
    tc.save(tmp_path / "tc")
    docs = write_documents(tmp_path / "docs.txt")
    argv = ["eval", "--sae", str(tmp_path / "tc"), "--model", str(llama_dir), "--local-files-only"]
    argv += ["--context-length", "16", "--text-file", str(docs), "--batch-size", "4"]
    assert main([*argv, "--n-batches", "2", "--json", str(tmp_path / "eval.json")]) == 0
    assert f"-> target {OUT_HOOK}" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (report["hook"], report["target_hook"]) == (IN_HOOK, OUT_HOOK)
    assert report["ce_sae"] == report["ce_zero"] and report["kl_sae"] == report["kl_zero"]
    assert report["ce_score"] == 0 and report["kl_score"] == 0
    assert report["fvu"] > 1 and report["n_tokens"] > 0


def test_saekit_train_with_a_target_hook_saves_a_skip_transcoder(llama_dir, tmp_path, capsys):
    """The README's command line, shortened: --set data.target_hook makes every SAE of the run a
    transcoder of the model's width."""
    from saekit.cli import main

    docs = write_documents(tmp_path / "docs.txt")
    argv = ["train", "--model", str(llama_dir), "--hook", IN_HOOK, "--text-file", str(docs)]
    argv += ["--local-files-only", "--context-length", "16", "--batch-size", "64", "--steps", "4"]
    argv += ["--set", f"data.target_hook={OUT_HOOK}", "--set", "saes.0.sae.skip=true"]
    argv += ["--set", "saes.0.sae.d_sae=64", "--set", "eval_tokens=128", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    (saved,) = [p.parent for p in (tmp_path / "run").glob("*/sae.safetensors")]
    tc = SAE.load(saved)
    assert (tc.cfg.d_in, tc.cfg.d_out, tc.cfg.skip) == (64, 64, True)
    assert (tc.cfg.hook, tc.cfg.target_hook) == (IN_HOOK, OUT_HOOK)


def test_a_transcoder_cache_trains_and_evaluates(llama, llama_dir, tmp_path):
    """saekit cache --target-hook stores [input | target] rows (the target is the MLP of the
    input); saekit train --cache fills in a transcoder; saekit eval --cache scores its target."""
    import json

    from saekit.cli import main
    from saekit.data.cache.reading import ActivationCache

    docs = write_documents(tmp_path / "docs.txt")
    common = ["--model", str(llama_dir), "--hook", IN_HOOK, "--local-files-only"]
    argv = ["cache", *common, "--target-hook", OUT_HOOK, "--text-file", str(docs)]
    argv += ["--context-length", "16", "--batch-size", "8", "--shard-tokens", "256"]
    assert main([*argv, "--max-tokens", "1000", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    cache = ActivationCache(tmp_path / "c")
    assert (cache.d, cache.hooks) == (128, [(IN_HOOK, 64), (OUT_HOOK, 64)])
    rows = cache.load_shard(0)
    with torch.no_grad():
        mlp = copy.deepcopy(llama.model.layers[1].mlp)
        torch.testing.assert_close(rows[:, 64:], mlp(rows[:, :64]), rtol=1e-5, atol=1e-5)

    argv = ["train", "--cache", str(tmp_path / "c"), "--batch-size", "64", "--steps", "4"]
    argv += ["--set", "saes.0.sae.skip=true", "--set", "saes.0.sae.d_sae=64", "--no-progress"]
    assert main([*argv, "--set", "eval_tokens=128", "--out", str(tmp_path / "run")]) == 0
    (saved,) = [p.parent for p in (tmp_path / "run").glob("*/sae.safetensors")]
    tc = SAE.load(saved)
    assert (tc.cfg.d_out, tc.cfg.skip, tc.cfg.target_hook) == (64, True, OUT_HOOK)
    argv = ["eval", "--sae", str(saved), "--cache", str(tmp_path / "c")]
    assert main([*argv, "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    held_out = cache.load_shard(cache.held_out_shard)[: report["n_tokens"]].double()
    y = held_out[:, 64:]
    with torch.no_grad():
        y_hat = tc(held_out[:, :64].float()).x_hat.double()
    fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert report["fvu"] == pytest.approx(float(fvu), rel=1e-4)


@pytest.mark.slow
def test_a_skip_transcoder_trained_on_the_mlp_beats_zero_ablation(llama, one_thread):
    """Pairs harvested in one pass; the spliced transcoder recovers most of the CE and KL that
    zero-ablating the MLP loses, on held-out samples of the model."""
    from saekit.core.configs import from_dict
    from saekit.data.lm.harvester import Harvester
    from saekit.train.member import Member
    from saekit.train.member_config import SAETrainConfig

    harvester = Harvester(llama, [IN_HOOK, OUT_HOOK], token_filter=ALL)
    acts = harvester(model_samples(llama, 96))
    pairs = torch.cat([acts[IN_HOOK], acts[OUT_HOOK]], dim=-1)  # [N, 64 + 64]
    sae = {**SKIP_TOPK["sae"], "d_in": 64, "d_out": 64}
    cfg = from_dict(SAETrainConfig, {"sae": sae, "lr": 3e-3, "dead_tokens": 4096})
    member = Member(cfg, 300, "cpu")
    member.init_from_data(pairs)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        member.train_step(pairs[torch.randint(len(pairs), (128,), generator=g)], step)
    tc = member.sae.eval()
    held_out = [model_samples(llama, 8, seed=seed) for seed in (1, 2, 3)]
    result = splice_eval(
        llama, OUT_HOOK, lambda x: tc(x).x_hat, held_out, token_filter=ALL, input_hook=IN_HOOK
    )
    assert result.ce_zero - result.ce_clean > 1.0, result  # the MLP matters
    assert result.ce_score > 0.5 and result.kl_score > 0.5, result
    assert result.fvu < 0.5, result
