"""Cross-layer transcoders and crosscoders on synthetic ground truth: is the true map recovered?
Prints markdown tables.

    python benchmarks/bench_clt.py [--steps N] [--threads T]

Data: the multi-hook world (saekit.data.synthetic.multihook, ``data.source: multihook``), whose
map between hooks is known.

CLT world: L = 4 layers, d = d_out = 32, F = 128 features (feature i reads layer i mod 4), 8
active per token in all, a residual stream (a feature stays in every later layer's input), each
feature writing its own unit vector into the targets of its layer and of the next span − 1, span
uniform over the layers it can reach. Trained through the run driver (``saekit train``'s path)
on the same stream (same seed, same tokens): one CLT (M = 128 latents per layer, TopK k per
layer = the true per-layer L0, rounded) and 4 per-layer transcoders (layer l's input → layer l's
target, M = 128, TopK k = the true L0 of the features writing that target, rounded). Scores, on
16,384 held-out tokens:

- per target l': recovery (saekit.eval.ground_truth.recovery: Hungarian MCC, share of true
  vectors with a decoder row at |cos| > 0.9) of the vectors written into target l' by the
  decoder rows into l' (the CLT's W_dec[l][:, l' − l] of every layer l ≤ l', the transcoder's
  W_dec), and the FVU of that target;
- per dictionary: latents, the L0 summed over layers beside the true one (the CLT's: the active
  features; the transcoders': every (active feature, target it writes) pair, since each target's
  transcoder must represent every feature writing there), and for the CLT the whole-feature
  recovery: each layer's features' concatenated write vectors [g_{i,l} … g_{i,L−1}] (0 outside
  the span) against that layer's latents' concatenated decoders (weights folded into the raw
  space, where the truth lives).

Crosscoder world: 2 sources a and b, d = 32, F = 128 features, half of them exclusive (32
only-a, 32 only-b, 64 shared). A crosscoder (M = 256, TopK k = true L0) and one SAE per source
(M = 256, k = that source's true L0). Per class of features: recovery of the concatenated
vectors [a | b] by the crosscoder's concatenated decoders, of each source's vectors by its SAE,
and the mean decoder norm in a and in b of each feature's best-matching crosscoder latent
(Model.decoder_norms_by_target; a shared feature's latent should carry both, an exclusive one's
only its own).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from saekit.data.hook_columns import split_hooks
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.multihook import MultiHookData
from saekit.eval.ground_truth import cosine_matrix, recovery
from saekit.eval.metrics import MetricAccumulator, latent_counts
from saekit.train.config import build_run_config
from saekit.train.config_files import load_config_file
from saekit.train.run import run_training

HERE = Path(__file__).resolve().parent
EVAL_TOKENS = 16_384


def train(run: dict, data: dict, entry: dict, args) -> tuple[Any, float]:
    """One dictionary through the run driver (``run``: a run config file's settings, with
    ``data`` and one SAE ``entry``); (its model, scales folded into the raw space, seconds)."""
    with tempfile.TemporaryDirectory() as out:
        raw = {
            **run,
            "data": data,
            "saes": [entry],
            "eval_tokens": EVAL_TOKENS,
            "checkpoint_every": 0,
            "progress": False,
            "threads": args.threads,
            "out_dir": out,
        }
        if args.steps:
            raw["steps"] = args.steps
        start = time.perf_counter()
        trainer, _ = run_training(build_run_config(raw))
        seconds = time.perf_counter() - start
    return trainer.members[0].sae.eval().folded_copy(), seconds


def one_hook(run: dict, entry: dict, hook: str, target: str | None, k: int) -> tuple[dict, dict]:
    """(data, SAE entry) of an SAE on ``hook`` (a transcoder to ``target``) of ``run``'s world:
    as many latents, the same learning rate, TopK k."""
    data = {"source": "multihook", "multihook": run["data"]["multihook"], "hook": hook}
    if target is not None:
        data["target_hook"] = target
    sae = {"d_sae": entry["sae"]["d_sae"], "activation": {"kind": "topk", "k": k}}
    return data, {"name": "sae", "sae": sae, "lr": entry["lr"]}


def held_out(run: dict) -> tuple[MultiHookData, dict[str, torch.Tensor]]:
    """The world of ``run`` (its stream seed) and, per hook, tokens of it no run trains on."""
    cfg = build_run_config(run)
    world = MultiHookData(cfg.data.multihook, stream_seed=cfg.seed)
    batch = world.batch(SyntheticSource.EVAL_INDEX, EVAL_TOKENS).x
    return world, split_hooks(batch, world.hooks)


def fvu(target: torch.Tensor, prediction: torch.Tensor) -> float:
    acc = MetricAccumulator(target.shape[-1], 1)
    acc.add_reconstruction(target, prediction)
    return float(acc.fvu())


def l0(latents) -> float:
    """Mean active latents per token (dense or sparse code)."""
    per_token, _ = latent_counts(latents)
    return float(per_token.double().mean())


# ------------------------------------------------------------------------------- CLT world
def clt_vs_transcoders(args) -> None:
    run = load_config_file(HERE / "clt.yaml")
    (entry,) = run.pop("saes")
    world, held = held_out({**run, "saes": [entry]})
    inputs, targets = run["data"]["input_hooks"], run["data"]["target_hooks"]
    L, M, plan = len(inputs), entry["sae"]["d_sae"], world.plan
    p = world.probabilities.double()
    true_clt_l0 = float(p.sum())
    clt, clt_s = train(run, run["data"], entry, args)
    with torch.no_grad():
        clt_out = clt(torch.cat([held[h] for h in inputs], 1))
    clt_pred = clt_out.x_hat.split(clt.cfg.d_out, dim=1)

    rows, plt_s, plt_l0, plt_true = [], 0.0, 0.0, 0.0
    for t in range(L):
        writers = world.writes(targets[t])
        true_l0 = float(p[writers].sum())
        k = max(1, round(true_l0))  # each transcoder at the true L0 of its target
        plt, seconds = train(run, *one_hook(run, entry, inputs[t], targets[t], k), args)
        plt_s += seconds
        with torch.no_grad():
            out = plt(held[inputs[t]])
        plt_l0, plt_true = plt_l0 + l0(out.latents), plt_true + true_l0
        truth = world.directions[targets[t]][writers]
        clt_rows = torch.cat([clt.W_dec[l][:, t - l].detach() for l in range(t + 1)])
        y = held[targets[t]]
        rows.append(
            (
                t,
                int(writers.sum()),
                recovery(truth, clt_rows),
                recovery(truth, plt.W_dec),
                fvu(y, clt_pred[t]),
                fvu(y, out.x_hat),
                k,
            )
        )

    whole = []  # each layer's features, all their targets at once, against its latents
    for l in range(L):
        features = plan.layer_of == l
        truth = torch.cat([world.directions[targets[t]][features] for t in range(l, L)], 1)
        whole.append(recovery(truth, clt.W_dec[l].detach().reshape(M, -1)).mcc)

    cfg = world.cfg
    steps = args.steps or run["steps"]
    print(
        f"CLT world: L = {L}, d = {cfg.d}, d_out = {clt.cfg.d_out}, F = {cfg.n_features}, true "
        f"L0 {true_clt_l0:.1f}, residual {cfg.residual}; {steps} steps of {run['batch_size']} "
        f"tokens, lr {entry['lr']}; {EVAL_TOKENS:,} held-out tokens\n"
    )
    print(
        "| target | features writing it | MCC CLT | MCC transcoder | share > 0.9 CLT | "
        "share > 0.9 transcoder | FVU CLT | FVU transcoder (its k) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t, n, rc, rp, fc, fp, k in rows:
        print(
            f"| layer {t} | {n} | {rc.mcc:.3f} | {rp.mcc:.3f} | {rc.recovered_share:.1%} | "
            f"{rp.recovered_share:.1%} | {fc:.3f} | {fp:.3f} ({k}) |"
        )
    print(
        "\n| dictionary | latents | L0 summed over layers (true) | mean FVU | "
        "whole-feature MCC | s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    k = clt.cfg.activation.k
    print(
        f"| CLT, TopK k = {k} per layer | {L * M} | {l0(clt_out.latents):.2f} "
        f"({true_clt_l0:.2f}) | {sum(r[4] for r in rows) / L:.3f} | {sum(whole) / L:.3f} | "
        f"{clt_s:.0f} |"
    )
    print(
        f"| {L} per-layer transcoders | {L * M} | {plt_l0:.2f} ({plt_true:.2f}) | "
        f"{sum(r[5] for r in rows) / L:.3f} | - | {plt_s:.0f} |\n"
    )


# ------------------------------------------------------------------------ crosscoder world
def crosscoder_vs_saes(args) -> None:
    run = load_config_file(HERE / "crosscoder.yaml")
    (entry,) = run.pop("saes")
    world, held = held_out({**run, "saes": [entry]})
    sources = run["data"]["input_hooks"]
    owner, p = world.plan.owner, world.probabilities.double()
    xc, xc_s = train(run, run["data"], entry, args)
    concatenated = torch.cat(list(xc.W_dec.detach()), dim=1)  # [M, S·d]
    norms = xc.decoder_norms_by_target()  # [M, S], raw space (scales folded)
    truth = torch.cat([world.directions[s] for s in sources], dim=1)
    best = cosine_matrix(truth, concatenated).abs().argmax(1)  # each feature's closest latent
    saes, sae_s = {}, 0.0
    for source in sources:
        k = max(1, round(float(p[world.writes(source)].sum())))
        saes[source], seconds = train(run, *one_hook(run, entry, source, None, k), args)
        sae_s += seconds
    x = torch.cat([held[s] for s in sources], 1)
    with torch.no_grad():
        xc_fvu = fvu(x, xc(x).x_hat)

    steps = args.steps or run["steps"]
    print(
        f"Crosscoder world: sources {', '.join(sources)}, d = {world.cfg.d}, F = "
        f"{world.cfg.n_features}, true L0 {float(p.sum()):.1f}; {steps} steps of "
        f"{run['batch_size']} tokens, lr {entry['lr']}; crosscoder M = {xc.cfg.d_sae}, TopK k = "
        f"{xc.cfg.activation.k}: FVU {xc_fvu:.3f}, {xc_s:.0f} s; the SAEs {sae_s:.0f} s\n"
    )
    heads = [f"MCC SAE on {s}" for s in sources] + [f"‖W_dec‖ in {s}" for s in sources]
    print(f"| features | n | MCC crosscoder | {' | '.join(heads)} |")
    print("|---|" + "---:|" * (2 + 2 * len(sources)))
    classes = [("shared", owner == -1)] + [(f"only {s}", owner == i) for i, s in enumerate(sources)]
    for label, mask in classes:
        cells = [f"{recovery(truth[mask], concatenated).mcc:.3f}"]
        for source in sources:
            rows = world.directions[source][mask & world.writes(source)]
            cells.append(f"{recovery(rows, saes[source].W_dec).mcc:.3f}" if len(rows) else "-")
        cells += [f"{v:.3f}" for v in norms[best[mask]].mean(0).tolist()]
        print(f"| {label} | {int(mask.sum())} | {' | '.join(cells)} |")
    print(
        "\n‖W_dec‖ in s: the mean, over the class's features, of the decoder norm in source s "
        "of the crosscoder latent closest to the feature (|cos| of the concatenations).\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="default: the config file's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=("clt", "crosscoder"), default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "clt"):
        clt_vs_transcoders(args)
    if args.only in (None, "crosscoder"):
        crosscoder_vs_saes(args)


if __name__ == "__main__":
    main()
