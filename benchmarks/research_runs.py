"""The experiments of docs/research.md (driver: research.py). Each returns plain data per seed.

One small SynthSAEBench world (saekit.data.synthetic.synthbench_world; 512 features in 48
dimensions, 16 trees of branching 3 and depth 2, low-rank correlation), SAEs of 256 latents (384
for revival), Adam lr 3e-3, batch 512; sized so the whole report trains in about half an hour on 2
busy cores.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import replace

import torch

from saekit.data.sources.synthbench import SynthBenchSource
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig, synthsaebench_16k
from saekit.eval import ground_truth
from saekit.eval.revived import class_shares, classify_revived, error_directions
from saekit.synthbench.bench import calibrated, eval_set, score
from saekit.train.config import build_run_config
from saekit.train.trainer import Trainer

WORLD = replace(synthsaebench_16k(), n_features=512, d=48, n_roots=16, branching=3, depth=2,
                correlation_rank=8)  # fmt: skip
D_SAE, BATCH, LR = 256, 512, 3e-3
STEPS = 300
Q3_STEPS, Q3_D_SAE, Q3_DEAD_TOKENS, Q3_KILLED = 400, 384, 25_000, 0.25
"""Latents rarely die on their own in runs this short, so at 40% of training a quarter of the
latents (the same ones for every revival) are killed: fresh random decoder rows, encoder rows
of the median norm, b_enc = 0, counters set to dead. Each revival signal then has the other
60% of training to bring them back."""
EVAL_TOKENS = 8192
BOS_SHARES = (0.0, 0.25, 0.5, 0.75)
REVIVALS = {  # label → revival config (TopK, k = the true L0)
    "auxk α=1/32": {"kind": "auxk", "coefficient": 1 / 32},
    "auxk α=1": {"kind": "auxk", "coefficient": 1.0},
    "preact": {"kind": "preact"},
    "input α=1": {"kind": "input", "coefficient": 1.0},
    "none": "none",
}


def world_cfg(bos_share: float = 0.0) -> SynthBenchConfig:
    return replace(WORLD, bos_share=bos_share)


def true_l0(data: SynthBenchData, n: int = 16_384) -> float:
    return data.batch(SynthBenchSource.INIT_INDEX + 1, n).firings.token.numel() / n


def make_trainer(entries: list[dict], data: SynthBenchData, out: str, seed: int,
                 steps: int = STEPS) -> Trainer:  # fmt: skip
    cfg = build_run_config({
        "data": {"source": "synthetic", "synthetic": {"d": data.cfg.d}},
        "saes": entries, "batch_size": BATCH, "steps": steps, "out_dir": out,
        "progress": False, "checkpoint_every": 0, "seed": seed,
    })  # fmt: skip
    return Trainer(cfg, SynthBenchSource(data, BATCH))


def entry(name: str, kind: str, k: int, seed: int, **extra) -> dict:
    return {"name": name, "sae": {"d_sae": extra.pop("d_sae", D_SAE),
            "activation": {"kind": kind, "k": k}}, "lr": LR, "seed": seed,
            "dead_tokens": 50_000, **extra}  # fmt: skip


@torch.no_grad()
def absorption(sae, data: SynthBenchData, held_out: list) -> float:
    """Share of (token, active child) pairs whose parent's latent is absorbed (ground_truth),
    with the SAE encoding as it is scored (BatchTopK at the threshold giving L0 = k:
    bench.calibrated), so every SAE is compared at the same L0."""
    sae = sae.eval()
    absorbed = total = 0
    with calibrated(sae, held_out):
        for x, coefficients in held_out:
            a, t = ground_truth.absorption_counts(
                data.directions, data.parent_of, coefficients, sae.encode(x), sae.W_dec
            )
            absorbed, total = absorbed + a, total + t
    return absorbed / total if total else math.nan


def q1_q2_seed(seed: int, world=None) -> list[dict]:
    """TopK vs BatchTopK at equal L0 per BOS share; Matryoshka-BatchTopK beside them at 0."""
    rows = []
    for share in BOS_SHARES:
        data = SynthBenchData(world_cfg(share), stream_seed=seed, world=world)
        k = max(1, round(true_l0(data)))
        entries = [entry("topk", "topk", k, seed), entry("batchtopk", "batchtopk", k, seed)]
        if share == 0.0:
            entries.append(entry("matryoshka", "batchtopk", k, seed,
                                 matryoshka={"kind": "random", "n_prefixes": 10}))  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(entries, data, out, seed)
            trainer.fit()
        held_out = eval_set(data, EVAL_TOKENS)
        for member in trainer.members:
            s = score(member.sae, data, held_out)
            rows.append({"seed": seed, "bos_share": share, "sae": member.cfg.name, "k": k,
                         "fvu": 1 - s.explained_variance, "l0": s.l0, "f1": s.f1,
                         "mcc": s.mcc, "absorption": absorption(member.sae, data, held_out)
                         if share == 0.0 else None})  # fmt: skip
    return rows


@torch.no_grad()
def snapshot_errors(sae, held_out: list) -> torch.Tensor:
    """[M, d] each latent's mean residual (raw space) at the snapshot."""
    sae = sae.eval()
    zs, residuals = [], []
    for x, _ in held_out:
        z = sae.encode(x)
        zs.append(z)
        residuals.append(x - sae.decode(z))
    sae.train()
    return error_directions(torch.cat(zs), torch.cat(residuals))


@torch.no_grad()
def fires_on(sae, held_out: list) -> torch.Tensor:
    sae = sae.eval()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for x, _ in held_out:
        fired |= (sae.encode(x) != 0).any(0)
    sae.train()
    return fired


@torch.no_grad()
def kill(member, latents: torch.Tensor, seed: int, x=None) -> None:
    """Make ``latents`` dead: random unit decoder rows, random encoder rows of the median norm,
    b_enc = 0, counters at the dead window (the same draw for every member of a seed).

    ``x`` given (a "hard" kill): b_enc = −3 × the RMS of the killed latents' pre-activations on
    x, so a killed latent's pre-activation is positive on about 0.1% of tokens and it cannot
    come back by chance through the reconstruction loss."""
    sae, g = member.sae, torch.Generator().manual_seed(seed + 1)
    n, d = latents.numel(), sae.cfg.d_in
    dec = torch.randn(n, d, generator=g, dtype=sae.W_dec.dtype)
    enc = torch.randn(n, d, generator=g, dtype=sae.W_enc.dtype)
    sae.W_dec[latents] = dec / dec.norm(dim=-1, keepdim=True)
    typical = sae.W_enc.norm(dim=-1).median()
    sae.W_enc[latents] = typical * enc / enc.norm(dim=-1, keepdim=True)
    sae.b_enc[latents] = 0
    if x is not None:
        pre = sae.pre_acts(sae.normalise(x))[:, latents]
        sae.b_enc[latents] = -3 * pre.pow(2).mean(0).sqrt()
    member.tokens_since_fired[latents] = member.cfg.dead_tokens


def q3_seed(seed: int, world=None, hard: bool = False) -> list[dict]:
    """Revival signals on one stream: latents killed at 40% of training (:func:`kill`) and
    alive at the end (training counters) = revived; classify what each became
    (saekit.eval.revived)."""
    data = SynthBenchData(world_cfg(), stream_seed=seed, world=world)
    k = max(1, round(true_l0(data)))
    entries = [entry(f"revival{i}", "topk", k, seed, d_sae=Q3_D_SAE, revival=rev,
                     dead_tokens=Q3_DEAD_TOKENS)
               for i, rev in enumerate(REVIVALS.values())]  # fmt: skip
    held_out = eval_set(data, EVAL_TOKENS)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(entries, data, out, seed, Q3_STEPS)
        trainer.cfg.steps = int(0.4 * Q3_STEPS)
        trainer.fit()
        killed = torch.randperm(Q3_D_SAE, generator=torch.Generator().manual_seed(seed))
        killed = killed[: int(Q3_KILLED * Q3_D_SAE)]
        for m in trainer.members:
            kill(m, killed, seed, held_out[0][0] if hard else None)
        snaps = [(copy.deepcopy(m.sae), ~m.dead_mask()) for m in trainer.members]
        errors = [snapshot_errors(s, held_out) for s, _ in snaps]
        trainer.cfg.steps = Q3_STEPS
        trainer.fit()
    rows = []
    for label, member, (snap, live), err in zip(REVIVALS, trainer.members, snaps, errors,
                                                strict=True):  # fmt: skip
        final = ~member.dead_mask()
        revived = ~live & final
        classes = classify_revived(member.sae.W_dec.detach(), snap.W_dec.detach(), revived,
                                   live, err, data.directions)  # fmt: skip
        s = score(member.sae, data, held_out)
        rows.append({"seed": seed, "revival": label, "k": k, "hard": hard,
                     "dead_at_snapshot": int((~live).sum()),
                     "revived": int(revived.sum()), "dead_at_end": int((~final).sum()),
                     "classes": class_shares(classes), "n_classes": {c: classes.count(c)
                     for c in set(classes)}, "f1": s.f1, "mcc": s.mcc,
                     "fvu": 1 - s.explained_variance, "uniqueness": s.uniqueness})  # fmt: skip
    return rows
