#!/usr/bin/env python
"""Mutation check: does the test suite notice deliberate faults in the SAE core?

Each fault is an exact text substitution in src/saekit (old text → new text) that must match
exactly once; if an anchor is missing or ambiguous the code moved and the fault must be updated
(that row reports ANCHOR and the script exits non-zero). For every fault: copy src/ to a temp
dir, apply the substitution, run pytest (``-x``) on the repo's tests with ``PYTHONPATH=<tmp>/src``
(it comes before the editable install's .pth entry, and saekit is a regular package, so the copy
wins; the script checks ``saekit.__file__`` in a subprocess), the fault's most relevant test
files first. A fault is "killed" when the suite fails, "SURVIVED" when it passes.

A baseline run (no fault) comes first; if it fails the faults are not run.

    .venv/bin/python tests/mutation_check.py                       # everything
    .venv/bin/python tests/mutation_check.py --faults lambda-ignored auxk-dropped
    .venv/bin/python tests/mutation_check.py --tests tests/objective/test_objective.py
    .venv/bin/python tests/mutation_check.py --list
    .venv/bin/python tests/mutation_check.py --anchors      # every anchor matches once; no runs

Exit status: 0 when the baseline passes and every fault is killed; 1 when a fault survives or
the baseline fails; 2 when an anchor is missing or ambiguous (or a usage error).
Not collected by pytest (no ``test_`` prefix); nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
TESTS = REPO / "tests"
SLOW_LAST = ("test_end_to_end.py",)  # run last: only a fault that passes everything else pays
# tests/interop's round trips with the real libraries need .benchenv (make test-interop); the
# formula tests beside them in tests/interop run here
REAL_LIBRARIES = (
    "test_real_libraries.py",
    "test_saebench.py",
    "test_transcoders_real.py",
    "test_saelens_world_real.py",
    "test_circuit_tracer_real.py",
    "test_synth_peer.py",
)


@dataclass
class Fault:
    name: str
    file: str
    """Path under src/saekit."""
    old: str
    new: str
    first: tuple[str, ...] = ("test_objective.py",)
    """Test files (under tests/) to run before the rest."""
    also: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)
    """Further (file, old, new) substitutions, when one fault needs two edits."""

    def substitutions(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.old, self.new), *self.also]


FAULTS = [
    # ----------------------------------------------------------------- required
    Fault(
        "auxk-dropped",
        "objective/terms.py",
        "        terms.append(AuxK(revival_cfg))",
        "        pass  # FAULT: AuxK dropped from the loss",
        ("test_objective.py", "test_trainer.py"),
    ),
    Fault(
        "auxk-bdec-in-ehat",
        "objective/revival.py",
        "    mse = reconstruction_loss(e_SD, e_hat_SD)  # mean_s ‖ê_s − e_s‖², one fused kernel",
        '    mse = reconstruction_loss(e_SD, e_hat_SD + getattr(preacts, "b_dec_D", 0.0))',
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "lambda-ignored",
        "objective/terms.py",
        "        return inputs.lam * value",
        "        return value",
        ("test_objective.py", "test_trainer.py"),
    ),
    Fault(
        "l0-penalty-dropped",
        "objective/terms.py",
        "            return inputs.lam * losses.l0_penalty(steps_NM, weights)",
        "            return 0.0 * inputs.lam * losses.l0_penalty(steps_NM, weights)",
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "parallel-grad-kept",
        "train/member.py",
        "            sae.remove_parallel_grad_()",
        "            pass  # FAULT: decoder-parallel gradient kept",
        ("test_objective.py", "test_trainer.py"),
    ),
    Fault(
        "renorm-skipped",
        "train/member.py",
        "            sae.normalize_decoder_()",
        "            pass  # FAULT: decoder rows not renormalised",
        ("test_objective.py", "test_trainer.py"),
    ),
    Fault(
        "dead-mask-after-count",
        "train/member.py",
        "            out = sae(*sae.split_stream(batch))\n",
        "            out = sae(*sae.split_stream(batch))\n"
        "            fired_M = latent_counts(out.latents)[1] > 0  # FAULT: mask after counting\n"
        "            dead = ~fired_M & (self.tokens_since_fired + batch.shape[0]"
        " >= cfg.dead_tokens)\n",
        ("test_objective.py", "test_trainer.py"),
    ),
    Fault(
        "theta-ema-frozen",
        "activations/batchtopk.py",
        "beta * self.threshold + (1 - beta) * batch_min, batch_min",
        "self.threshold, batch_min",
        ("test_objective.py", "test_activations.py"),
    ),
    Fault(
        "matryoshka-last-prefix-dropped",
        "objective/matryoshka.py",
        "    return prefix_mse(delta_PND, x_n.reshape(-1, d) - b_dec_D, detach_inner).mean()",
        "    return prefix_mse(delta_PND, x_n.reshape(-1, d) - b_dec_D, detach_inner)[:-1].mean()",
        ("test_objective.py", "test_matryoshka.py"),
    ),
    Fault(
        "scale-not-folded-on-save",
        "model/sae.py",
        "        copy.fold_scale_()\n",
        "",
        ("test_objective.py", "test_sae.py", "test_checkpoint.py"),
    ),
    Fault(
        "jumprelu-theta-chain-rule-dropped",
        "activations/jumprelu.py",
        "            return self.log_threshold.exp()",
        # the value θ, but the θ-gradient reaches log_threshold without the factor θ
        "            return self.log_threshold"
        " + (self.log_threshold.exp() - self.log_threshold).detach()",
        ("test_activations.py", "test_jumprelu.py"),
    ),
    Fault(
        "jumprelu-theta-grad-without-theta",
        "activations/jumprelu.py",
        "        ste_NM = (threshold / eps) * _rectangle((pre - threshold) / eps) * grad",
        "        ste_NM = (1.0 / eps) * _rectangle((pre - threshold) / eps) * grad",
        ("test_jumprelu.py", "test_activations.py"),
    ),
    Fault(
        "jumprelu-ste-to-input-dropped",
        "activations/jumprelu.py",
        "            grad_pre = grad_pre + ste_NM.to(pre.dtype)",
        "            grad_pre = grad_pre",
        ("test_jumprelu.py", "test_activations.py"),
    ),
    Fault(
        "jumprelu-threshold-cast-to-bf16",
        "activations/jumprelu.py",
        "                param.data = param.data.float()  # in place",
        "                pass  # in place",
        ("test_jumprelu.py",),
    ),
    Fault(
        "legacy-log-threshold-not-exponentiated",
        "activations/jumprelu.py",
        '            found["activation.threshold"] = found.pop(legacy).exp()',
        '            found["activation.threshold"] = found.pop(legacy)',
        ("test_jumprelu.py", "test_checkpoint.py"),
    ),
    Fault(
        "whitening-fold-skips-the-encoder",
        "model/normalisation.py",
        "    W_enc_MD = W_enc.double() @ w.matrix.T",
        "    W_enc_MD = W_enc.double()",
        ("test_whitening.py",),
    ),
    Fault(
        "whitening-fold-drops-the-mean",
        "model/normalisation.py",
        "    b_dec_D = b_dec.double() @ w.inverse + w.mean",
        "    b_dec_D = b_dec.double() @ w.inverse",
        ("test_whitening.py",),
    ),
    Fault(
        "whitening-mean-not-subtracted",
        "model/normalisation.py",
        "    return (x_n - w.mean.to(x_n.dtype)) @ w.matrix.to(x_n.dtype)",
        "    return x_n @ w.matrix.to(x_n.dtype)",
        ("test_whitening.py",),
    ),
    Fault(
        "whitening-eps-ignored",
        "model/normalisation.py",
        "    lam = eigenvalues.clamp_min(0) + cfg.eps",
        "    lam = eigenvalues.clamp_min(1e-12)",
        ("test_whitening.py",),
    ),
    Fault(
        "convert-keeps-the-ema-threshold",
        "commands/convert.py",
        "        cal = calibrate_batchtopk(sae, batches, args.max_tokens)",
        "        cal = calibrate_batchtopk(sae, batches, args.max_tokens, apply=False)",
        ("test_convert.py",),
    ),
    Fault(
        "quadratic-l0-not-squared",
        "objective/losses.py",
        "    return (2.0 / target_l0 * (l0_N - target_l0).pow(2)).mean()",
        "    return (2.0 / target_l0 * (l0_N - target_l0).abs()).mean()",
        ("test_jumprelu.py", "test_losses.py"),
    ),
    Fault(
        "batchtopk-k-per-token",
        "kernels/select.py",
        "    top = pre_NM.reshape(-1).topk(k * n_tokens, sorted=False)\n"
        "    flat_E, order = top.indices.sort()\n"
        "    return top.values[order], flat_E",
        "    top = pre_NM.topk(k, dim=-1)  # FAULT: k per token, not k·N over the batch\n"
        "    rows = torch.arange(n_tokens, device=pre_NM.device)[:, None] * pre_NM.shape[1]\n"
        "    flat_E, order = (top.indices + rows).reshape(-1).sort()\n"
        "    return top.values.reshape(-1)[order], flat_E",
        ("test_speed_paths.py", "test_objective.py", "test_activations.py", "test_kernels.py"),
    ),
    # ----------------------------------------------------------------- speed paths (issue 16)
    Fault(
        "batchtopk-candidates-trusted-blindly",
        "kernels/select.py",
        "    if bool(exact):",
        "    if True:  # FAULT: the candidates' exactness flag ignored",
        ("test_speed_paths.py", "test_kernels.py"),
    ),
    Fault(
        "dead-set-without-slack",
        "objective/revival.py",
        "            near_M = counters_M + self.slack >= self.dead_tokens",
        "            near_M = counters_M >= self.dead_tokens",
        ("test_speed_paths.py", "test_trainer.py"),
    ),
    Fault(
        "auxk-columns-grad-not-masked",
        "kernels/columns.py",
        "            g_pre_SC = (grad_SD @ W_dec_CD.T).mul_(z_SC > 0)",
        "            g_pre_SC = grad_SD @ W_dec_CD.T",
        ("test_speed_paths.py", "test_objective.py"),
    ),
    Fault(
        "auxk-columns-grad-w-dec-input-width",
        "kernels/columns.py",
        "grad_SD.new_zeros(M, d_out)",
        "grad_SD.new_zeros(M, d_in)",
        ("test_transcoder_auxk_columns.py",),
    ),
    Fault(
        "checkpoint-json-hash-unchecked",
        "train/checkpoint.py",
        "        if recorded != sha256_file(meta_path):",
        "        if False:",
        ("test_resume_integrity.py",),
    ),
    Fault(
        "checkpoint-json-types-unchecked",
        "train/checkpoint.py",
        "    problem = _meta_problem(meta)\n",
        "    problem = None\n",
        ("test_resume_integrity.py",),
    ),
    Fault(
        "resume-config-yaml-not-compared",
        "train/resume_check.py",
        "flat_differences(recorded, current)",
        "flat_differences(recorded, recorded)",
        ("test_resume_integrity.py",),
    ),
    Fault(
        "output-inside-input-allowed",
        "core/paths.py",
        "        if _inside(out, source) and source not in allowed:",
        "        if False:",
        ("test_outputs_over_inputs.py",),
    ),
    Fault(
        "preflight-memory-unchecked",
        "train/preflight.py",
        "    if need > total:",
        "    if False:",
        ("test_run_preflight.py",),
    ),
    Fault(
        "failed-start-left-behind",
        "train/run.py",
        '    (out / "config.yaml").unlink(missing_ok=True)',
        "    pass",
        ("test_run_preflight.py",),
    ),
    Fault(
        "nan-weights-loaded",
        "model/format.py",
        "    if nonfinite:  # a diverged run's",
        "    if False:  # a diverged run's",
        ("test_accepted_nonsense.py",),
    ),
    Fault(
        "inference-forward-unchecked",
        "model/sae.py",
        "        if not self.training:  # inference refuses NaN/inf input",
        "        if False:  # inference refuses NaN/inf input",
        ("test_accepted_nonsense.py",),
    ),
    Fault(
        "yaml-duplicate-keys-kept",
        "train/config_files.py",
        "            if isinstance(key, str) and key in seen:",
        "            if False:",
        ("test_accepted_nonsense.py",),
    ),
    Fault(
        "held-out-without-documents-unsaid",
        "data/cache/reading.py",
        '    if held is None or held.get("documents"):',
        "    if True:",
        ("test_heldout_no_document.py",),
    ),
    Fault(
        "theta-zero-reason-dropped",
        "eval/calibrate.py",
        "    if threshold is not None and threshold <= 0 and l0 < target:",
        "    if False:",
        ("test_l0_warnings.py",),
    ),
    Fault(
        "auxk-subsample-normaliser-from-sample",
        "objective/revival.py",
        "        variance = torch.var(e_ND, dim=0, correction=0).sum()",
        "        variance = torch.var(e_SD, dim=0, correction=0).sum()",
        ("test_speed_paths.py", "test_objective.py"),
    ),
    # ----------------------------------------------------------------- more that matter
    Fault(
        "auxk-normaliser-dropped",
        "objective/revival.py",
        "        mse = mse / variance.clamp_min(torch.finfo(variance.dtype).tiny)",
        "        mse = mse",
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "auxk-dead-share-dropped",
        "objective/revival.py",
        "    return alpha * (n_dead / k_aux).clamp(max=1.0) * mse",
        "    return alpha * mse",
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "auxk-selects-live-latents",
        "kernels/select.py",
        "        candidates_NC.masked_fill_(~dead_C, -math.inf)",
        "        candidates_NC.masked_fill_(torch.zeros_like(dead_C), -math.inf)",
        ("test_objective.py", "test_kernels.py", "test_losses.py"),
    ),
    Fault(
        "penalty-not-decoder-weighted",
        "objective/terms.py",
        "            inputs.sae.encoder_view().decoder_norms(),\n",
        "            inputs.sae.encoder_view().decoder_norms().detach() * 0 + 1,\n",
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "penalty-f0-constant-dropped",
        "objective/losses.py",
        "            return terms_E.sum() / n_tokens + absent * f0 / n_tokens",
        "            return terms_E.sum() / n_tokens",
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "penalty-tanh-ignores-c",
        "objective/config.py",
        "        return torch.tanh(self.c * a)",
        "        return torch.tanh(a)",
        ("test_losses.py",),
    ),
    Fault(
        "penalty-sqrt-at-zero-is-log",
        "objective/config.py",
        "        return math.sqrt(self.eps)",
        "        return math.log(self.eps)",
        ("test_losses.py",),
    ),
    Fault(
        "penalty-log-eps-default-not-field",
        "objective/config.py",
        "        return torch.log(a + self.eps)",
        "        return torch.log(a + 0.1)",
        ("test_losses.py",),
    ),
    Fault(
        "matryoshka-penalty-not-prefix-averaged",
        "objective/terms.py",
        "    return matryoshka.prefix_weights(inputs.prefixes, W_dec.shape[0], W_dec)",
        "    return None",
        ("test_objective.py", "test_matryoshka.py"),
    ),
    Fault(
        "dead-counters-not-reset",
        "train/member.py",
        "            fired, torch.zeros_like(self.tokens_since_fired),"
        " self.tokens_since_fired + n_tokens",
        "            fired, self.tokens_since_fired, self.tokens_since_fired + n_tokens",
        ("test_objective.py", "test_trainer.py"),
    ),
    Fault(
        "preact-threshold-not-detached",
        "objective/revival.py",
        "    gap_NM = torch.relu(theta.detach() - pre_NM)",
        "    gap_NM = torch.relu(theta - pre_NM)",
        ("test_objective.py", "test_losses.py"),
        # TopK's θ is detached at its source too; undo both so the fault is not equivalent
        also=(
            (
                "activations/topk.py",
                "        values_Nk, _ = self.select(enc.preacts.detached, self.cfg.k)",
                "        values_Nk, _ = self.select(enc.preacts.dense(), self.cfg.k)",
            ),
        ),
    ),
    Fault(
        "topk-firing-threshold-is-the-largest",
        "activations/topk.py",
        "        min_NG = values_Nk.reshape(values_Nk.shape[0], self.groups, -1).min(-1).values",
        "        min_NG = values_Nk.reshape(values_Nk.shape[0], self.groups, -1).max(-1).values",
        ("test_objective.py", "test_activations.py"),
    ),
    Fault(
        "sparse-encoder-bdec-grad-sign",
        "kernels/sparse.py",
        "                grad_b_dec = -(db_enc_M @ W_enc_MD)",
        "                grad_b_dec = db_enc_M @ W_enc_MD",
        ("test_objective.py", "test_kernels.py"),
    ),
    Fault(
        "sparse-decode-dW-unpermuted",
        "kernels/sparse.py",
        "            values_E.index_select(0, order),",
        "            values_E,",
        ("test_objective.py", "test_kernels.py"),
    ),
    Fault(
        "prolu-ste-backward-as-relu",
        "activations/prolu.py",
        "            grad_m, grad_b_NM = g_gate * (1 + m), g_gate * m",
        "            grad_m, grad_b_NM = g_gate, g_gate",
        ("test_objective.py", "test_activations.py"),
    ),
    Fault(
        "input-not-divided-by-scale",
        "model/sae.py",
        "        x_n = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) / self.scale",
        "        x_n = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)",
        ("test_objective.py", "test_sae.py"),
    ),
    Fault(
        "reconstruction-mean-over-d",
        "objective/losses.py",
        '    return F.mse_loss(x_hat_ND, x_ND, reduction="sum") / x_ND.shape[0]',
        '    return F.mse_loss(x_hat_ND, x_ND, reduction="mean")',
        ("test_objective.py", "test_losses.py"),
    ),
    Fault(
        "interop-transcoder-skip-not-exported",
        "interop/portable.py",
        "        p.W_skip = sae.folded_copy().W_skip.detach().cpu() if sae.cfg.skip else None",
        "        p.W_skip = None",
        ("test_interop_transcoders.py",),
    ),
    Fault(
        "interop-transcoder-skip-scale-not-folded",
        "interop/portable.py",
        "        p.W_skip = sae.folded_copy().W_skip.detach().cpu() if sae.cfg.skip else None",
        "        p.W_skip = sae.W_skip.detach().cpu() if sae.cfg.skip else None",
        ("test_interop_transcoders.py",),
    ),
    Fault(
        "interop-circuit-tracer-threshold-dropped",
        "interop/circuit_tracer.py",
        "            tensors[THRESHOLD] = p.threshold.to(p.W_enc.dtype)",
        "            pass",
        ("test_interop_transcoders.py",),
    ),
    Fault(
        "interop-gemma-scope-skip-not-transposed",
        "interop/gemma_scope.py",
        "    p.W_skip = t[SKIP].T.contiguous() if SKIP in t else None",
        "    p.W_skip = t[SKIP].contiguous() if SKIP in t else None",
        ("test_interop_transcoders.py",),
    ),
    # ----------------------------------------------------------------- CLT exchange (issue 24)
    Fault(
        "interop-clt-scale-not-folded",
        "interop/portable_clt.py",
        "    folded = clt.folded_copy()",
        "    folded = clt",
        ("test_interop_clt.py",),
    ),
    Fault(
        "interop-clt-threshold-latent-order",  # θ of latent l·M + i is layer l's latent i
        "interop/portable_clt.py",
        "        threshold=None if form.threshold is None else form.threshold.reshape(L, M),",
        "        threshold=None if form.threshold is None else form.threshold.reshape(M, L).T,",
        ("test_interop_clt.py",),
    ),
    Fault(
        "interop-circuit-tracer-clt-threshold-dropped",
        "interop/circuit_tracer_clt.py",
        '            enc[f"threshold_{i}"] = pc.threshold[i].to(pc.W_enc.dtype)',
        "            pass",
        ("test_interop_clt.py",),
    ),
    Fault(
        "interop-circuit-tracer-clt-bias-of-layer-0",  # b_dec_i is target i's bias
        "interop/circuit_tracer_clt.py",
        '        enc = {f"W_enc_{i}": pc.W_enc[i], f"b_enc_{i}": pc.b_enc[i], '
        'f"b_dec_{i}": pc.b_dec[i]}',
        '        enc = {f"W_enc_{i}": pc.W_enc[i], f"b_enc_{i}": pc.b_enc[i], '
        'f"b_dec_{i}": pc.b_dec[0]}',
        ("test_interop_clt.py",),
    ),
    Fault(
        "interop-gemma-scope-clt-decoders-not-from-own-layer",  # w_dec[:, l:], not the first L − l
        "interop/gemma_scope_clt.py",
        "        [w[:, layer:].contiguous() for layer, w in enumerate(w_dec)],",
        "        [w[:, : n - layer].contiguous() for layer, w in enumerate(w_dec)],",
        ("test_interop_clt.py",),
    ),
    Fault(
        "interop-gemma-scope-clt-threshold-not-clamped",
        "interop/gemma_scope_clt.py",
        '        threshold=stack["threshold"].clamp_min(0.0),  # ReLU(pre)·H(pre − θ), see above',
        '        threshold=stack["threshold"],',
        ("test_interop_clt.py",),
    ),
    Fault(
        "interop-circuit-tracer-import-threshold-ignored",
        "interop/circuit_tracer.py",
        '        "jumprelu" if THRESHOLD in t else "relu", t["W_enc"], t["b_enc"], t["W_dec"], '
        't["b_dec"]',
        '        "relu", t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]',
        ("test_interop_transcoders.py",),
    ),
    Fault(
        "interop-circuit-tracer-set-layer-by-position",  # layer_N holds the transcoder of block N
        "interop/circuit_tracer.py",
        "    for layer, p in sorted(zip(layers, ps, strict=True), key=lambda pair: pair[0]):",
        "    for layer, p in zip(sorted(layers), ps, strict=True):",
        ("test_interop_transcoders.py",),
    ),
    Fault(
        "interop-saelens-transcoder-import-centred",
        "interop/saelens.py",
        '    if not transcoder and not cfg.get("apply_b_dec_to_input", True):',
        '    if not cfg.get("apply_b_dec_to_input", True):',
        ("test_interop_transcoders.py",),
    ),
    # ----------------------------------------------------------------- interop (issue 11)
    Fault(
        "interop-saelens-w_enc-not-transposed",
        "interop/saelens.py",
        '    tensors = {"W_enc": p.W_enc.T, "b_enc"',
        '    tensors = {"W_enc": p.W_enc, "b_enc"',
        ("test_interop.py",),
    ),
    Fault(
        "interop-rescale-not-folded",
        "interop/saelens.py",
        '        if cfg.get("rescale_acts_by_decoder_norm", False):',
        "        if False:",
        ("test_interop.py",),
    ),
    Fault(
        "interop-saelens-b_dec-input-ignored",
        "interop/saelens.py",
        '    if not transcoder and not cfg.get("apply_b_dec_to_input", True):',
        "    if False:",
        ("test_interop.py",),
    ),
    Fault(
        "interop-theta-scaled-by-the-fold",  # SAELens #763: θ off by the folded scale factor
        "interop/portable.py",
        "k=form.k, threshold=form.threshold, extra=extra)",
        "k=form.k, threshold=None if form.threshold is None else form.threshold * sae.scale.cpu(),"
        " extra=extra)",
        ("test_interop.py",),
    ),
    Fault(
        "interop-prolu-theta-sign",
        "activations/prolu.py",
        "        theta = (-self.bias.detach().cpu()).clamp_min(0.0)",
        "        theta = self.bias.detach().cpu().clamp_min(0.0)",
        ("test_interop.py",),
    ),
    Fault(
        "interop-batchtopk-export-threshold-ema-zero",  # exported θ_i must be BatchTopK's θ
        "activations/batchtopk.py",
        "        thresholds = torch.full((self.d_sae,), theta, dtype=self.threshold.dtype)",
        "        thresholds = torch.zeros((self.d_sae,), dtype=self.threshold.dtype)",
        ("test_interop.py", "test_convert.py"),
    ),
    Fault(
        "interop-import-threshold-not-loaded",  # an imported JumpReLU keeps its init θ
        "activations/jumprelu.py",
        "        self.threshold.copy_(theta)  # threshold_param: direct (from_export's default)",
        "        pass",
        ("test_interop.py",),
    ),
    Fault(
        "abstopk-exports-as-topk",  # AbsTopK inheriting TopK's export would drop the signs
        "activations/abstopk.py",
        '        return ExportForm("abstopk", k=self.cfg.k)',
        '        return ExportForm("topk", k=self.cfg.k)',
        ("test_interop.py",),
    ),
    Fault(
        "l0-target-batchtopk-not-k",
        "activations/batchtopk.py",
        "        return float(self.k)",
        "        return penalty_target",
        ("test_calibrate.py",),
    ),
    Fault(
        "batchtopk-calibrated-on-evaluated-tokens",  # issue 28: the old L0 = k by construction
        "train/outputs.py",
        "        skip = 0 if calibration is None else calibration.n_tokens\n",
        "        skip = 0\n",
        ("test_calibration_split.py",),
        also=(
            (
                "eval/calibrate.py",
                "    return n_tokens // 2\n",
                "    return n_tokens\n",
            ),
        ),
    ),
    Fault(
        "batchtopk-calibration-tokens-evaluated",  # the split without skipping the first half
        "train/outputs.py",
        "        skip = 0 if calibration is None else calibration.n_tokens\n",
        "        skip = 0\n",
        ("test_calibration_split.py",),
    ),
    Fault(
        "report-training-overlap-unchecked",  # issue 28: report said nothing on training text
        "commands/report.py",
        "    seen = check_overlap(sae, tokenizer, text, len(read), ranges, verbs=(",
        "    seen = None and check_overlap(sae, tokenizer, text, len(read), ranges, verbs=(",
        ("test_heldout.py",),
    ),
    Fault(
        "long-document-warning-printed",  # issue 28: every BERT run printed it
        "data/lm/text.py",
        'add_special_tokens=False, verbose=False)["input_ids"]',
        'add_special_tokens=False)["input_ids"]',
        ("test_long_document_warning.py",),
    ),
    Fault(
        "pipeline-held-out-check-skipped",  # issue 28: the pipeline trained, then eval failed
        "commands/pipeline.py",
        "    if problem:  # stage 3 would fail after training: stop before it\n",
        "    if False:  # stage 3 would fail after training: stop before it\n",
        ("test_heldout_no_document.py",),
    ),
    Fault(
        "report-forward-not-prefetched",  # issue 28: report at a fraction of cache's tokens/s
        "report/collect.py",
        "    yield from forwards if PREFETCH <= 0 else prefetched(forwards, PREFETCH)\n",
        "    yield from forwards\n",
        ("test_report_prefetch.py",),
    ),
    Fault(
        "ownership-kind-switch-planted",  # same behaviour, but a name switch outside activations/
        "train/outputs.py",
        "    if sae.activation.calibrated_threshold:",
        '    if sae.cfg.activation.kind == "batchtopk":',
        ("test_architecture_ownership.py",),
    ),
    Fault(
        "interop-dl-jumprelu-b_dec-subtracted",
        "interop/dictionary_learning.py",
        "    b_enc = b_enc + W_enc.double().mv(b_dec.double()).to(b_enc.dtype)\n",
        "",
        ("test_interop.py",),
    ),
    Fault(
        "interop-dl-topk-as-threshold",
        "interop/dictionary_learning.py",
        "        _topk,\n",
        "        _batchtopk,\n",
        ("test_interop.py",),
    ),
    Fault(
        "interop-gated-b_mag-not-shifted",
        "interop/saelens.py",
        '            extra["b_mag"] = extra["b_mag"] + shift.to(b_enc.dtype)\n',
        "",
        ("test_interop.py",),
    ),
    Fault(
        "interop-w_skip-accepted",
        "interop/saelens.py",
        "    if unexpected or missing:",
        "    if missing:",
        ("test_interop_cli.py",),
    ),
    Fault(
        "transcoder-skip-folded-without-input-scale",
        "model/sae.py",
        "            self.W_skip *= s_y / s",
        "            self.W_skip *= s_y",
        ("test_transcoder.py",),
    ),
    Fault(
        "transcoder-target-normalised-by-input-scale",
        "model/sae.py",
        "        return y.reshape(-1, width).to(self.W_dec.dtype) / self.output_scale",
        "        return y.reshape(-1, width).to(self.W_dec.dtype) / self.scale",
        ("test_transcoder.py",),
    ),
    Fault(
        "transcoder-prefixes-without-skip-path",
        "objective/terms.py",
        "        offset = view.decoder_offset_n(out.x_n)",
        "        offset = view.b_dec",
        ("test_transcoder.py",),
    ),
    Fault(
        "transcoder-auxk-residual-of-input",
        "objective/terms.py",
        "(inputs.out.target() - inputs.out.x_hat_n).detach()",
        "(inputs.out.x_n[:, : inputs.out.x_hat_n.shape[-1]] - inputs.out.x_hat_n).detach()",
        ("test_transcoder.py",),
    ),
    # ----------------------------------------------------------------- issue 14 architectures
    Fault(
        "abstopk-selects-by-signed-pre",
        "activations/abstopk.py",
        "    _, latent_Nk = topk_select(pre_NM.detach().abs(), k)",
        "    _, latent_Nk = topk_select(pre_NM.detach(), k)",
        ("test_arch_abstopk.py",),
    ),
    Fault(
        "abstopk-relus-kept-values",
        "activations/abstopk.py",
        "        return values  # signed: no ReLU",
        "        return torch.relu(values)  # signed: no ReLU",
        ("test_arch_abstopk.py",),
    ),
    Fault(
        "gated-r-mag-not-exponentiated",
        "activations/gated.py",
        "        pi_mag_NM = m_NM * self.r_mag.exp() + self.b_mag",
        "        pi_mag_NM = m_NM * (1 + self.r_mag) + self.b_mag",
        ("test_arch_gated.py",),
    ),
    Fault(
        "gated-aux-decoder-not-frozen",
        "activations/gated.py",
        "        x_hat_gate_ND = torch.addmm(offset, gate_NM, view.W_dec.detach())",
        "        x_hat_gate_ND = torch.addmm(offset, gate_NM, view.W_dec)",
        ("test_arch_gated.py",),
    ),
    Fault(
        "gated-penalty-on-latents",
        "activations/gated.py",
        "        return torch.relu(enc.preacts.dense())\n",
        "        return enc.latents\n",
        ("test_arch_gated.py",),
    ),
    Fault(
        "mp-residual-not-updated",
        "activations/matching_pursuit.py",
        "            r_ND = r_ND - c_N.unsqueeze(1) * u_j_ND",
        "            r_ND = r_ND - 0 * c_N.unsqueeze(1) * u_j_ND",
        ("test_arch_matching_pursuit.py",),
    ),
    Fault(
        "mp-code-not-divided-by-decoder-norm",
        "activations/matching_pursuit.py",
        "scatter_add(1, latent_Nk, coef_Nk / norms_M[latent_Nk])",
        "scatter_add(1, latent_Nk, coef_Nk)",
        ("test_arch_matching_pursuit.py",),
    ),
    Fault(
        "htopk-prefixes-in-ascending-order",
        "activations/hierarchical_topk.py",
        "    order_Nk = values_Nk.detach().argsort(-1, descending=True)",
        "    order_Nk = values_Nk.detach().argsort(-1, descending=False)",
        ("test_arch_hierarchical_topk.py",),
    ),
    Fault(
        "htopk-only-the-full-prefix",
        "activations/hierarchical_topk.py",
        "decoder_offset_n(out.x_n)).mean()",
        "decoder_offset_n(out.x_n))[-1:].mean()",
        ("test_arch_hierarchical_topk.py",),
    ),
    Fault(
        "htopk-inference-k-ignored",
        "activations/hierarchical_topk.py",
        "        return self.cfg.inference_k\n",
        "        return self.cfg.k\n",
        ("test_arch_hierarchical_topk.py",),
    ),
    # ------------------------------------------------- SynthSAEBench (issue 13)
    Fault(
        "synthbench-no-mutual-exclusion",
        "data/synthetic/synthbench_sampler.py",
        "    win = _one_winner(tok * world.cfg.n_features + par, g)",
        "    win = torch.ones_like(tok, dtype=torch.bool)",
        ("test_synthbench.py",),
    ),
    Fault(
        "synthbench-v1-children",
        "data/synthetic/synthbench_sampler.py",
        "    if world.cfg.scale_children:",
        "    if False:",
        ("test_synthbench.py",),
    ),
    Fault(
        "synthbench-copula-unthinned",
        "data/synthetic/synthbench_sampler.py",
        "    keep = torch.rand(token.numel(), generator=g) * q_F[local].float() < p_E",
        "    keep = torch.ones_like(token, dtype=torch.bool)",
        ("test_synthbench.py",),
    ),
    Fault(
        "synthbench-exclusion-on-every-parent",
        "data/synthetic/synthbench_sampler.py",
        "    win = win | ~world.exclusive[par]",
        "    win = win",
        ("test_saelens_world.py",),
    ),
    # ------------------------------------------------- SAELens's saved worlds (issue 27)
    Fault(
        "saelens-world-magnitude-seeds-swapped",
        "data/synthetic/saelens_world.py",
        "MEAN_SEED_OFFSET, STD_SEED_OFFSET = 2, 1",
        "MEAN_SEED_OFFSET, STD_SEED_OFFSET = 1, 2",
        ("test_saelens_world.py",),
    ),
    Fault(
        "saelens-sampler-children-ungated",
        "data/synthetic/saelens_sampler.py",
        "            _gate_level(acts, world, level)\n",
        "            pass\n",
        ("test_saelens_world.py",),
    ),
    Fault(
        "saelens-sampler-ignores-exclusion",
        "data/synthetic/saelens_sampler.py",
        "    batch_idx, group_idx = torch.where(active.sum(2) > 1)",
        "    batch_idx, group_idx = torch.where(active.sum(2) > 99)",
        ("test_saelens_world.py",),
    ),
    Fault(
        "synth-recall-as-precision",
        "synthbench/metrics.py",
        "    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), zero)",
        "    recall = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), zero)",
        ("test_synth_metrics.py",),
    ),
    Fault(
        "synth-mcc-over-latents",
        "synthbench/metrics.py",
        "    return float(abs_cos[rows, cols].mean())",
        "    return float(abs_cos[rows, cols].sum() / abs_cos.shape[1])",
        ("test_synth_metrics.py",),
    ),
    Fault(
        "input-revival-fits-residual",
        "objective/terms.py",
        "        return revival.input_target(out.target(), view.decoder_offset_n(out.x_n))",
        "        return (out.target() - out.x_hat_n).detach()",
        ("test_objective.py",),
    ),
    # ----------------------------------------------------------------- feature report
    Fault(
        "report-tie-later-token-first",
        "report/topk.py",
        "        by_key = torch.cat([self.key, key_Mk], dim=1).argsort(dim=1, stable=True)",
        "        by_key = torch.cat([self.key, key_Mk], dim=1).argsort(dim=1, descending=True)",
        ("test_report_topk.py",),
    ),
    Fault(
        "report-window-shifted",
        "report/topk.py",
        "torch.arange(-self.left, self.tokens.shape[2] - self.left)",
        "torch.arange(1 - self.left, self.tokens.shape[2] - self.left + 1)",
        ("test_report_topk.py",),
    ),
    Fault(
        "report-histogram-doubling-drops-counts",
        "report/topk.py",
        "            half = self.counts.view(M, n_bins // 2, 2).sum(-1)",
        "            half = self.counts.view(M, n_bins // 2, 2)[..., 0]",
        ("test_report_topk.py",),
    ),
    Fault(
        "report-sample-largest-draws",
        "report/collect.py",
        "        self.sample.update(-u_n, flat_n,",
        "        self.sample.update(u_n, flat_n,",
        ("test_report_topk.py",),
    ),
    Fault(
        "report-logit-effects-unscaled",
        "report/build.py",
        "    return (sae.denormalise(rows) - sae.denormalise(torch.zeros_like(rows[:1])))",
        "    return (rows - 0 * sae.denormalise(torch.zeros_like(rows[:1])))",
        ("test_report_features.py",),
    ),
    Fault(
        "report-shading-by-last-context",
        "report/site.py",
        '    scale = e["max_act"]',
        '    scale = e["top"][-1]["value"] if e["top"] else 0.0',
        ("test_report_site.py",),
    ),
    # ----------------------------------------------------------------- issue 16, second pass
    Fault(
        "row-dot-sampled-rows-shifted",
        "kernels/primitives.py",
        "    crow = torch.cat([offsets_N, offsets_N.new_full((1,), n_entries)]).to(torch.int64)",
        "    crow = torch.cat([offsets_N.new_zeros(1), offsets_N]).to(torch.int64)",
        ("test_kernels.py",),
    ),
    Fault(
        "bag-sum-slices-reordered",
        "kernels/primitives.py",
        "    return torch.cat(slices, dim=1)",
        "    return torch.cat(slices[::-1], dim=1)",
        ("test_kernels.py",),
    ),
    Fault(
        "by-latent-token-from-remainder",
        "kernels/layout.py",
        '                token_by_latent = torch.div(order, self.per_token, rounding_mode="floor")',
        "                token_by_latent = order % self.per_token",
        ("test_kernels.py", "test_objective.py"),
    ),
    Fault(
        "auxk-masks-the-shared-pre",
        "objective/revival.py",
        "    fresh = rows_S is not None or dead_cols is not None  # pre_SC is a gathered copy",
        "    fresh = True",
        ("test_kernels.py", "test_objective.py", "test_speed_paths.py"),
    ),
    Fault(
        "auxk-values-misaligned",
        "objective/revival.py",
        "    pre_E = preacts.selected(value_Sk.reshape(-1), layout)",
        "    pre_E = preacts.selected(value_Sk.sort(dim=1).values.reshape(-1), layout)",
        ("test_speed_paths.py", "test_kernels.py", "test_objective.py"),
    ),
    Fault(
        "auxk-variance-per-dimension",
        "objective/revival.py",
        "        variance = torch.var(e_ND, dim=0, correction=0).sum()",
        "        variance = torch.var(e_ND, dim=0, correction=0).mean()",
        ("test_speed_paths.py", "test_objective.py", "test_losses.py"),
    ),
    Fault(
        "parallel-grad-unit-rows-assumed",
        "model/sae.py",
        '    coef_M = torch.einsum("md,md->m", G_w, W_w) / sq_norms_M',
        '    coef_M = torch.einsum("md,md->m", G_w, W_w)',
        ("test_sae.py",),
    ),
    Fault(
        "workspace-ignores-holders",
        "kernels/workspace.py",
        "    return _storage_use_count(buffer.untyped_storage()._cdata) > 2",
        "    return False",
        ("test_workspace.py",),
    ),
    Fault(
        "workspace-hands-out-the-cache",
        "kernels/workspace.py",
        "    return buffer.view(n_rows, n_cols)",
        "    return buffer",
        ("test_workspace.py",),
    ),
    Fault(
        "workspace-reuses-shared-memory",
        "kernels/workspace.py",
        "    if buffer.is_shared():\n        return True\n",
        "",
        ("test_workspace.py",),
    ),
    Fault(
        "workspace-ignores-a-held-storage-object",
        "kernels/workspace.py",
        "    if _storage_object_refs(buffer) > _LONE_STORAGE_OBJECT_REFS:\n        return True\n",
        "",
        ("test_workspace.py",),
    ),
    Fault(
        "workspace-in-inference-mode",
        "kernels/workspace.py",
        " or torch.is_inference_mode_enabled():",
        ":",
        ("test_workspace.py",),
    ),
    Fault(
        "parallel-grad-coefficients-in-fp16",
        "model/sae.py",
        "    work = torch.promote_types(W_MD.dtype, torch.float32)",
        "    work = W_MD.dtype",
        ("test_sae.py",),
    ),
    Fault(
        "reconstruction-broadcast-ignored",
        "objective/losses.py",
        "    x_ND = x_n.to(dtype).expand(shape).reshape(-1, shape[-1])",
        "    x_ND = x_n.to(dtype).reshape(-1, shape[-1])",
        ("test_losses.py",),
    ),
    Fault(
        "batchtopk-floor-count-unchecked",
        "kernels/select.py",
        "    if not n_keep <= flat_C.numel() <= FLOOR_CANDIDATES_PER_KEPT * n_keep:",
        "    if flat_C.numel() > FLOOR_CANDIDATES_PER_KEPT * n_keep:",
        ("test_speed_paths.py", "test_kernels.py"),
        also=(
            (
                "kernels/select.py",
                "    chosen = values_C.topk(n_keep, sorted=False).indices.sort().values",
                "    chosen = values_C.topk(min(n_keep, flat_C.numel()), sorted=False)"
                ".indices.sort().values",
            ),
        ),
    ),
    Fault(
        "batchtopk-floor-not-token-major",
        "kernels/select.py",
        "    chosen = values_C.topk(n_keep, sorted=False).indices.sort().values",
        "    chosen = values_C.topk(n_keep, sorted=False).indices",
        ("test_speed_paths.py", "test_kernels.py"),
    ),
    # ------------------------------------------------------------- data sources (issue 23)
    Fault(
        "source-foreign-field-dropped",
        "data/sources/config.py",
        '        raise ValueError(f"{where}.{name} means nothing for {where}.source {kind!r}")',
        "        dropped.append(name)",
        ("test_data_sources.py",),
    ),
    Fault(
        "source-switch-keeps-fields",
        "data/sources/config.py",
        "            for name in [n for n in section if n not in own]:",
        "            for name in []:",
        ("test_data_sources.py", "test_cli.py"),
    ),
    Fault(
        "synthbench-source-ignores-run-seed",
        "data/sources/synthbench.py",
        "SynthBenchData(self.synthbench, run.seed)",
        "SynthBenchData(self.synthbench)",
        ("test_data_sources.py",),
    ),
    # ------------------------------------------------------------- N hooks per pass (issue 24)
    Fault(
        "cache-hook-widths-unchecked",
        "data/cache/reading.py",
        "        if any(not isinstance(w, int) or w < 1 for w in widths) or sum(widths) != self.d:",
        "        if any(not isinstance(w, int) or w < 1 for w in widths):",
        ("test_multi_hook.py", "test_cache.py"),
    ),
    Fault(
        "cache-hook-width-change-accepted",
        "data/cache/writing.py",
        '        elif entry["width"] != width:',
        "        elif False:",
        ("test_multi_hook.py", "test_cache.py"),
    ),
    Fault(
        "cache-hooks-written-sorted",
        "data/cache/writing.py",
        "            batch = join_hooks(batch, names)",
        "            batch = join_hooks(batch, sorted(names))",
        ("test_multi_hook.py", "test_cache.py"),
    ),
    Fault(
        "cache-v1-target-width-wrong",
        "data/cache/reading.py",
        "    widths = [d] if len(names) == 1 else [d_in, None if d is None else d - d_in]",
        "    widths = [d] if len(names) == 1 else [d_in, d_in]",
        ("test_multi_hook.py", "test_transcoder_lm.py"),
    ),
    Fault(
        "hook-columns-off-by-one",
        "data/hook_columns.py",
        "        slices[name] = slice(start, start + width)\n        start += width",
        "        slices[name] = slice(start, start + width)\n        start += width - 1",
        ("test_multi_hook.py",),
    ),
    Fault(
        "select-columns-assumes-adjacent",
        "data/hook_columns.py",
        "    if all(a.stop == b.start for a, b in zip(chosen, chosen[1:], strict=False)):",
        "    if True:",
        ("test_multi_hook.py",),
    ),
    Fault(
        "many-hooks-default-unrefused",
        "data/hook_columns.py",
        "        if len(names) <= 2:\n            return list(names)",
        "        if True:\n            return list(names)",
        ("test_multi_hook.py",),
    ),
    # model diffing: several models on the same tokens (data/lm/model_set.py)
    Fault(
        "model-set-runs-the-first-model-for-every-label",
        "data/lm/model_set.py",
        "                self.setups[label].model,",
        "                self.first.model,",
        ("test_model_set.py",),
    ),
    Fault(
        "model-set-vocabularies-unchecked",
        "data/lm/model_set.py",
        "        if moved:",
        "        if False:",
        ("test_model_set.py",),
    ),
    Fault(
        "cache-manifest-models-unchecked",
        "data/lm/model_set.py",
        '            split_hook(name, checked, f"hooks.{i}")',
        "                pass",
        ("test_model_set.py",),
    ),
    Fault(
        "hf-model-set-provenance-dropped",
        "data/sources/hf.py",
        '            record["models"] = dict(self.models)',
        "            pass",
        ("test_model_diff_training.py",),
    ),
    Fault(
        "cache-source-ignores-hook-selection",
        "data/sources/cache.py",
        "        self.columns = select_columns(self.cache.hooks, self.hooks)\n",
        "",
        ("test_multi_hook.py",),
        also=(
            (
                "data/sources/cache.py",
                "        self.d = self.measured_width = sum(widths[name] for name in self.hooks)",
                "        self.d = self.measured_width = sum(widths[name] for name in self.hooks)\n"
                "        self.columns = slice(None, self.d)",
            ),
        ),
    ),
    Fault(
        "hf-source-yields-every-harvested-hook",
        "data/sources/hf.py",
        "            yield join_hooks(out, self.hooks).cpu()",
        "            yield join_hooks(out, [str(h) for h in self.harvester.hooks]).cpu()",
        ("test_multi_hook.py",),
    ),
    Fault(
        "eval-cache-reads-whole-rows",
        "eval/saved.py",
        "        columns, selected = select_columns(cache.hooks, names), names",
        "        columns, selected = slice(None, sum(widths[n] for n in names)), names",
        ("test_multi_hook.py",),
    ),
    Fault(
        "source-width-unchecked",
        "train/config.py",
        "        if s.sae.stream_width != width:",
        "        if False:",
        ("test_sources.py", "test_transcoder_lm.py"),
    ),
    Fault(
        "data-parallel-gradients-not-averaged",
        "train/member.py",
        '            self.comm.all_reduce(bucket, "avg", f"gradients of {self.cfg.name}")',
        "            pass  # FAULT: each rank steps on its own gradients",
        ("test_comm.py", "test_distributed.py"),
    ),
    Fault(
        "data-parallel-counters-add-the-local-batch",
        "train/member.py",
        "                n_tokens *= comm.world_size",
        "                pass  # FAULT: dead counters add this rank's tokens only",
        ("test_comm.py", "test_distributed.py"),
    ),
    Fault(
        "all-reduce-avg-not-divided",
        "train/comm.py",
        "            x.div_(self.world_size)",
        "            pass  # FAULT: avg is the sum",
        ("test_distributed.py",),
    ),
    # ------------------------------------------------------- latent parallelism (issue 25)
    Fault(
        "latent-topk-keeps-every-part-top-k",  # no global selection across the parts
        "activations/topk.py",
        "        kept_Nk = chosen_per_row(rows, k, shard.comm, "
        '"TopK candidates").reshape_as(values_Nk)',
        "        kept_Nk = torch.ones_like(values_Nk, dtype=torch.bool)",
        ("test_latent_member.py", "test_latent_parallel.py"),
    ),
    Fault(
        "latent-selection-takes-part-0s-winners",
        "kernels/sharded_select.py",
        "    return hit[:, comm.rank * c : (comm.rank + 1) * c]",
        "    return hit[:, :c]",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-batchtopk-keeps-k-per-data-group-token-count",  # k·N_local, not k·N of the batch
        "activations/batchtopk.py",
        "        n_keep = self.cfg.k * n_tokens * (shard.world.world_size // shard.count)",
        "        n_keep = self.cfg.k * n_tokens",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-batchtopk-selects-within-the-latent-group",
        "activations/batchtopk.py",
        '        kept_E = chosen_overall(values_E, n_keep, shard.world, "BatchTopK candidates")',
        '        kept_E = chosen_overall(values_E, n_keep, shard.comm, "BatchTopK candidates")',
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-auxk-keeps-every-part-dead-top-k",
        "objective/sharded.py",
        '    kept_Nk = chosen_per_row(value_Nk, k_aux, shard.comm, "AuxK candidates")'
        " & (value_Nk > 0)",
        "    kept_Nk = value_Nk > 0",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-partial-sums-averaged",  # the decoder's reduction: a mean, not the sum
        "core/shard.py",
        '        return comm.all_reduce(total, "sum", what)',
        '        return comm.all_reduce(total, "avg", what)',
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-replicated-gradient-counted-t-times",  # b_dec's decoder gradient not 1/T
        "train/latent_member.py",
        "        view, f = self.sae.encoder_view(), 1.0 / self.mesh.T",
        "        view, f = self.sae.encoder_view(), 1.0",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-part-gradients-summed-over-data-groups",
        "train/latent_member.py",
        '            _bucket_reduce(rows, mesh.data, "avg", f"gradients of {self.cfg.name}", 1)',
        '            _bucket_reduce(rows, mesh.data, "sum", f"gradients of {self.cfg.name}", 1)',
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-clip-at-the-part-norm",
        "train/latent_member.py",
        '        total = self.mesh.latent.all_reduce(parts, "sum", "gradient norm")'
        " + sum(shared_sq, zero)",
        "        total = parts + sum(shared_sq, zero)",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-init-draws-the-first-rows",
        "train/latent_parts.py",
        "    W = _unit(normal_rows(gen, M, d_out, a, n))",
        "    W = _unit(normal_rows(gen, M, d_out, 0, n))",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-htopk-rank-within-the-part",
        "activations/hierarchical_topk.py",
        '        every_TNk = shard.comm.all_gather(positive_Nk, "HierarchicalTopK kept values")',
        "        every_TNk = positive_Nk.unsqueeze(0)",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-checkpoint-reads-part-0-rows",
        "train/latent_checkpoint.py",
        '                    f"{prefix}{key}", M, shard.offset, shard.width, axes[key]',
        '                    f"{prefix}{key}", M, 0, shard.width, axes[key]',
        ("test_latent_checkpoint.py",),
    ),
    Fault(
        "latent-clt-topk-keeps-k-per-token-not-per-layer",  # the (token, layer) groups merged
        "activations/topk.py",
        "        rows = values_Nk.reshape(-1, k)  # one row per (token, group)",
        "        rows = values_Nk  # one row per (token, group)",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-clt-part-proposes-k-over-all-its-layers",
        "activations/topk.py",
        "        values_Nk, latent_Nk = grouped_select(pre.detached, k, self.groups)\n"
        "        rows = values_Nk.reshape(-1, k)",
        "        values_Nk, latent_Nk = grouped_select(pre.detached, k, 1)\n"
        "        rows = values_Nk.reshape(-1, k)",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-clt-flat-parts-joined-layer-blind",  # θ, dead counters: [L·M/T] parts cat
        "train/latent_parts.py",
        "    if groups == 1:\n        return torch.cat(parts, dim)",
        "    if True:\n        return torch.cat(parts, dim)",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-clt-checkpoint-slices-flat-layers-as-one",
        "train/latent_checkpoint.py",
        "        n_parts, (dim, groups) = len(self.parts), axis",
        "        n_parts, (dim, groups) = len(self.parts), (axis[0], 1)",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-clt-encoder-rows-from-the-first-layer",  # d_in ≠ d_out: W_enc's draw
        "train/latent_parts.py",
        "    wanted = [(g * per_group + start, count) for g in range(groups)]",
        "    wanted = [(start, count) for g in range(groups)]",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-crosscoder-penalty-weight-of-the-concatenation",  # ‖[W^0|W^1]_i‖, not Σ_s
        "objective/sharded.py",
        "s.activation.penalty_latents(enc), view.decoder_norms(), self.penalty, weights",
        "s.activation.penalty_latents(enc), view.W_dec.norm(dim=-1), self.penalty, weights",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-clt-dense-part-sum-drops-later-layers",  # JumpReLU's dense latents
        "model/clt.py",
        "        for layer in range(1, L):\n            z_l = latents[:, layer * M",
        "        for layer in range(1, 1):\n            z_l = latents[:, layer * M",
        ("test_latent_clt.py",),
    ),
    Fault(
        "latent-preact-dead-count-of-the-part",  # n_dead not summed over the latent group
        "objective/sharded.py",
        "            whole, n_dead = next(sums)[0], next(sums)[0].clamp_min(1.0)",
        "            whole, n_dead = next(sums)[0], (next(sums)[0] * 0 + s.dead_mask.sum())"
        ".clamp_min(1.0)",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-topk-firing-threshold-of-the-part",  # each part's own k-th value, not global
        "activations/topk.py",
        '        kth_R = kth_per_row(values_Nk.reshape(-1, k), k, shard.comm, "TopK firing '
        'threshold")',
        "        kth_R = values_Nk.reshape(-1, k).min(-1).values",
        ("test_latent_member.py",),
    ),
    Fault(
        "latent-batchtopk-firing-threshold-of-the-part",  # no MIN over the world
        "activations/batchtopk.py",
        '        theta = shard.world.all_reduce(local, "min", "BatchTopK firing threshold")',
        "        theta = local",
        ("test_latent_member.py",),
    ),
    Fault(
        "absorption-main-latents-count-as-absorbers",
        "eval/absorption.py",
        "    candidate_NM = (cos >= ABSORPTION_FRACTION_PROBE_COS) & ~main & (latent_proj_NM > 0)",
        "    candidate_NM = (cos >= ABSORPTION_FRACTION_PROBE_COS) & (latent_proj_NM > 0)",
        ("test_absorption.py",),
    ),
    Fault(
        "absorption-full-ignores-projection-share",
        "eval/absorption.py",
        "        & (top_proj >= PROBE_PROJECTION_PROPORTION * proj)",
        "        & (top_proj >= 0)",
        ("test_absorption.py",),
    ),
    Fault(
        "absorption-split-never-stops",
        "eval/absorption.py",
        "        if f1 > best + F1_JUMP:",
        "        if f1 > best - F1_JUMP:",
        ("test_absorption.py",),
    ),
    Fault(
        "probe-selection-signed-mean-diff",
        "eval/sparse_probing.py",
        "    diff = (z[y_N].mean(0) - z[~y_N].mean(0)).abs()",
        "    diff = z[y_N].mean(0) - z[~y_N].mean(0)",
        ("test_sparse_probing.py",),
    ),
    Fault(
        "l1-probe-no-soft-threshold",
        "eval/logistic.py",
        "        new[:-1] = torch.sign(w) * (w.abs() - step * l1).clamp_min(0)",
        "        new[:-1] = w",
        ("test_sparse_probing.py", "test_absorption.py"),
    ),
    Fault(
        "absorption-cosine-of-encoder",
        "eval/absorption.py",
        "            dirs = (sae.decode(rows) - offset).double().cpu()",
        "            dirs = (rows @ sae.W_enc).double().cpu()",
        ("test_absorption.py",),
    ),
    Fault(
        "finetune-kl-reversed",
        "train/finetune.py",
        "    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).mean()",
        "    kl = (logp.exp() * (logp - logp_clean)).sum(-1).mean()",
        ("test_finetune.py",),
    ),
    Fault(
        "finetune-mse-unscaled",
        "train/finetune.py",
        "    return kl_weight * kl + (1 - kl_weight) * mse_scale * mse, kl, mse",
        "    return kl_weight * kl + (1 - kl_weight) * mse, kl, mse",
        ("test_finetune.py",),
    ),
    # issue 24 items 4 and 6: a CLT spliced in for every MLP, per-part metrics, decoder norms
    Fault(
        "replacement-zero-ablates-one-target",
        "eval/replacement.py",
        "                for target in targets:\n",
        "                for target in targets[:1]:\n",
        ("test_replacement.py",),
    ),
    Fault(
        "replacement-prediction-not-spliced",
        "eval/replacement.py",
        "        out[keep_BT] = y_hat.to(act_BTd.dtype)\n",
        "        out[keep_BT] = y\n",
        ("test_replacement.py",),
    ),
    Fault(
        "replacement-reads-clean-residuals",  # the spliced pass runs on the clean pass's inputs
        "eval/replacement.py",
        "            code, y_hat = clt.run(stacked(acts, keep_BT))\n",
        "            clean_acts.update(acts)\n"
        "            code, y_hat = clt.run(stacked(acts, keep_BT))\n",
        ("test_replacement.py",),
        also=(
            (
                "eval/replacement.py",
                "reader.read(layer, layer_input(acts, keep_BT, layer, t))",
                "reader.read(layer, layer_input(clean_acts, keep_BT, layer, t))",
            ),
            (
                "eval/replacement.py",
                "    L = len(inputs)\n",
                "    L = len(inputs)\n    clean_acts = {}\n",
            ),
        ),
    ),
    Fault(
        "parts-pooled-fvu-mean-of-part-ratios",
        "eval/parts.py",
        "        return float(err / var)",
        "        return float(sum(a.fvu() for a in self.parts) / len(self.parts))",
        ("test_parts.py", "test_replacement.py"),
    ),
    Fault(
        "parts-total-l0-of-first-layer",
        "eval/parts.py",
        "        self.whole.add_counts(per_token_LN.sum(0), per_latent)",
        "        self.whole.add_counts(per_token_LN[0], per_latent)",
        ("test_parts.py", "test_replacement.py"),
    ),
    Fault(
        "parts-sparse-layer-of-latent-mod",
        "eval/parts.py",
        "latents.latent // M * latents.n_tokens + latents.token",
        "latents.latent % M * latents.n_tokens + latents.token",
        ("test_parts.py",),
    ),
    Fault(
        "norms-relative-difference-reversed",
        "eval/decoder_norms.py",
        "    return 0.5 * (r[1] - r[0] + 1)",
        "    return 0.5 * (r[0] - r[1] + 1)",
        ("test_decoder_norms.py",),
    ),
    Fault(
        "norms-shared-when-any-source-large",
        "eval/decoder_norms.py",
        "    cls[(r >= SHARED_MIN).all(0)] = SHARED",
        "    cls[(r >= SHARED_MIN).any(0)] = SHARED",
        ("test_decoder_norms.py",),
    ),
    Fault(
        "norms-only-with-one-small-source",
        "eval/decoder_norms.py",
        "        others_small = (r <= ONLY_MAX).sum(0) == S - 1  # every source but the largest",
        "        others_small = (r <= ONLY_MAX).sum(0) >= 1",
        ("test_decoder_norms.py",),
    ),
    Fault(
        "dictionaries-clt-norms-not-scale-folded",
        "eval/dictionaries.py",
        "        scaled = by_target * dictionary.target_scale.double().view(1, L)",
        "        scaled = by_target",
        ("test_dictionaries.py",),
    ),
    Fault(
        "dictionaries-crosscoder-norms-not-scale-folded",
        "eval/dictionaries.py",
        "    return (by_target * dictionary.scale.double().view(1, -1)).T.contiguous().cpu()",
        "    return by_target.T.contiguous().cpu()",
        ("test_dictionaries.py", "test_saved_multi.py"),
    ),
    Fault(
        "dictionaries-parts-shifted",  # each part scored on the next part's columns
        "eval/dictionaries.py",
        "        acc.add(p, target[..., start : start + width], x_hat[..., start : start + width])",
        "        acc.add(p, target[..., start : start + width], x_hat[..., -width:])",
        ("test_saved_multi.py",),
    ),
    Fault(
        "report-clt-norm-of-wrong-target",
        "report/features.py",
        "        norms = [[targets[t], float(norms_LMT[layer, i, t])] for t in range(layer, L)]",
        "        norms = [[targets[t], float(norms_LMT[layer, i, t - layer])]"
        " for t in range(layer, L)]",
        ("test_report_multi.py",),
    ),
    Fault(
        "report-multi-stream-not-split",  # a CLT scored against its inputs, not its targets
        "report/collect.py",
        "            x_in, target = sae.split_stream(x_Nd) if multi else (x_Nd, None)",
        "            x_in, target = (sae.split_stream(x_Nd)[0], None) if multi else (x_Nd, None)",
        ("test_report_multi.py",),
    ),
    Fault(
        "run-eval-json-without-parts",
        "train/outputs.py",
        "        report.parts = parts_report(sae, parts)",
        "        pass",
        ("test_saved_multi.py",),
    ),
    Fault(
        "norms-own-layer-share-of-max",
        "eval/decoder_norms.py",
        "    total = norms.sum(-1)",
        "    total = norms.max(-1).values",
        ("test_decoder_norms.py",),
    ),
    # ------------------------------------------------- cross-layer transcoders, crosscoders
    Fault(
        "clt-encoder-reads-layer-0",
        "kernels/layered.py",
        "torch.addmm(b_enc_LM[l], x_NLD[:, l], W_enc_LMD[l].T, out=block)",
        "torch.addmm(b_enc_LM[l], x_NLD[:, 0], W_enc_LMD[l].T, out=block)",
        ("test_clt.py",),
    ),
    Fault(
        "clt-sparse-encoder-grad-from-layer-0",
        "kernels/layered.py",
        "rows_E = layout.token * n_layers + torch.div(",
        "rows_E = layout.token * n_layers + 0 * torch.div(",
        ("test_clt.py",),
    ),
    Fault(
        "clt-sparse-decode-into-earlier-targets",
        "kernels/layered.py",
        "            out[:, layer * d_out :] += part.to(dtype)",
        "            out[:, : (len(W_dec) - layer) * d_out] += part.to(dtype)",
        ("test_clt.py",),
    ),
    Fault(
        "clt-sparse-decode-layers-out-of-order",
        "kernels/layered.py",
        "    order = torch.sort(layer_E, stable=True).indices",
        "    order = torch.sort(layer_E, stable=True, descending=True).indices",
        ("test_clt.py",),
    ),
    Fault(
        "clt-topk-decode-takes-layer-0-entries",  # TopK per layer: layer l's entries by position
        "kernels/layered.py",
        "take = (first_N1 + (layer * k + torch.arange(k, device=device))).reshape(-1)",
        "take = (first_N1 + (0 * k + torch.arange(k, device=device))).reshape(-1)",
        ("test_clt.py", "test_layered.py"),
    ),
    Fault(
        "clt-topk-decode-reads-counts",  # the sync-free cut skipped: a host read per step
        "kernels/layered.py",
        "if layout is not None and layout.per_group is not None and layout.groups == n_layers:",
        "if False:",
        ("test_layered.py",),
    ),
    Fault(
        "clt-sparse-decode-grad-from-target-0",  # each layer's gradient from its own columns
        "kernels/layered.py",
        "grad_ND[:, layer * ctx.d_out :], values, W, layout",
        "grad_ND[:, : grad_ND.shape[1] - layer * ctx.d_out], values, W, layout",
        ("test_clt.py", "test_layered.py"),
    ),
    Fault(
        "clt-dense-encoder-grad-from-layer-0",
        "kernels/layered.py",
        "torch.mm(grad_NLM[:, l].T, x_NLD[:, l].to(W_enc_LMD.dtype), out=grad_W[l])",
        "torch.mm(grad_NLM[:, l].T, x_NLD[:, 0].to(W_enc_LMD.dtype), out=grad_W[l])",
        ("test_clt.py", "test_layered.py"),
    ),
    Fault(
        "clt-layer-by-layer-bias-of-layer-0",
        "model/clt_layers.py",
        "+ self.clt.b_dec[target]",
        "+ self.clt.b_dec[0]",
        ("test_clt.py", "test_replacement.py"),
    ),
    Fault(
        "clt-layer-by-layer-decodes-into-earlier-targets",
        "model/clt_layers.py",
        "        self._sums_n[:, layer * d_out :] += part",
        "        self._sums_n[:, : part.shape[1]] += part",
        ("test_clt.py", "test_replacement.py"),
    ),
    Fault(
        "clt-jumprelu-layer-thresholds-of-layer-0",
        "activations/jumprelu.py",
        "theta = self.theta()[group * width : (group + 1) * width]",
        "theta = self.theta()[:width]",
        ("test_clt.py",),
    ),
    Fault(
        "clt-dense-decode-into-earlier-targets",
        "model/clt.py",
        "            out[:, layer * d_out :] += z_l @ self.W_dec[layer].view(M, -1)",
        "            out[:, : (L - layer) * d_out] += z_l @ self.W_dec[layer].view(M, -1)",
        ("test_clt.py",),
    ),
    Fault(
        "clt-penalty-weighted-by-own-target-only",
        "model/clt.py",
        "        norms = [W.reshape(M, -1).norm(dim=-1) for W in self.W_dec]",
        "        norms = [W[:, 0].norm(dim=-1) for W in self.W_dec]",
        ("test_clt.py",),
    ),
    Fault(
        "clt-one-scale-for-every-layer",
        "model/clt.py",
        "        s = scale.view(L, 1)",
        "        s = scale[0]",
        ("test_clt.py",),
    ),
    Fault(
        "clt-target-scale-is-the-input-scale",
        "model/clt.py",
        "            t = estimate_scale(y_l)",
        "            t = s",
        ("test_clt.py",),
    ),
    Fault(
        "clt-fold-scales-misaligned",
        "model/clt.py",
        "            W *= t[layer:].view(1, L - layer, 1)",
        "            W *= t[: L - layer].view(1, L - layer, 1)",
        ("test_clt.py",),
    ),
    Fault(
        "clt-unit-norm-per-target",
        "model/clt.py",
        "            normalize_rows_(W.view(self.cfg.d_sae, -1))",
        "            normalize_rows_(W.view(-1, W.shape[-1]))",
        ("test_clt.py", "test_clt_training.py"),
    ),
    Fault(
        "clt-topk-across-layers",
        "activations/topk.py",
        "    if groups == 1:\n",
        "    if True:  # FAULT: k per token over all layers\n",
        ("test_clt.py",),
    ),
    Fault(
        "clt-firing-threshold-groups-interleaved",
        "activations/topk.py",
        "min_NG.repeat_interleave(d_sae // groups, dim=1)",
        "min_NG.repeat(1, d_sae // groups)",
        ("test_clt.py",),
    ),
    Fault(
        "crosscoder-penalty-norm-of-concatenation",
        "model/crosscoder.py",
        "        return self.W_dec.norm(dim=-1).sum(0)",
        "        return self.W_dec.norm(dim=(0, 2))",
        ("test_crosscoder.py",),
    ),
    Fault(
        "crosscoder-encoder-uncentred",
        "model/crosscoder.py",
        "            self.b_enc,\n            b_dec,\n",
        "            self.b_enc,\n            torch.zeros_like(b_dec),\n",
        ("test_crosscoder.py",),
    ),
    Fault(
        "crosscoder-rows-not-per-latent",
        "model/crosscoder.py",
        "        return W_SMD.permute(1, 0, 2).reshape(M, S * d)",
        "        return W_SMD.reshape(M, S * d)",
        ("test_crosscoder.py",),
    ),
    Fault(
        "crosscoder-one-scale-for-every-source",
        "model/crosscoder.py",
        "        s = self.scale.view(S, 1)",
        "        s = self.scale[0]",
        ("test_crosscoder.py",),
    ),
    Fault(
        "crosscoder-fold-skips-b_dec",
        "model/crosscoder.py",
        "        self.b_dec *= s.view(S, 1)\n",
        "",
        ("test_crosscoder.py",),
    ),
    Fault(
        "hook-lists-drop-the-targets",
        "data/hook_columns.py",
        "    return inputs + targets",
        "    return inputs",
        ("test_clt_training.py",),
    ),
    Fault(
        "clt-layers-counted-with-targets",
        "train/config.py",
        '    fields: dict[str, Any] = {cls.count_field: len(inputs), "hooks": inputs}',
        '    fields: dict[str, Any] = {cls.count_field: len(inputs + targets), "hooks": inputs}',
        ("test_clt_training.py",),
    ),
    # ------------------------------------- multi-hook ground truth (issue 24: CLT, crosscoder)
    Fault(
        "multihook-residual-skips-own-layer",
        "data/synthetic/multihook.py",
        "        return layers >= start if self.residual else layers == start",
        "        return layers > start if self.residual else layers == start",
        ("test_multihook.py",),
    ),
    Fault(
        "multihook-span-one-too-long",
        "data/synthetic/multihook.py",
        "        return (layers >= start) & (layers < start + self.span.unsqueeze(1))",
        "        return (layers >= start) & (layers <= start + self.span.unsqueeze(1))",
        ("test_multihook.py",),
    ),
    Fault(
        "multihook-exclusive-written-everywhere",
        "data/synthetic/multihook.py",
        "        return (self.owner.unsqueeze(1) == -1) | (self.owner.unsqueeze(1) == sources)",
        "        return (self.owner.unsqueeze(1) == -1) | (self.owner.unsqueeze(1) >= 0)",
        ("test_multihook.py",),
    ),
    Fault(
        "multihook-truth-of-the-input-hook",
        "data/synthetic/multihook.py",
        "        self.features = torch.nonzero(data.writes(self.names[-1])).flatten()",
        "        self.features = torch.nonzero(data.writes(self.names[0])).flatten()",
        ("test_multihook.py",),
    ),
    # SynthSAEBench recipes (issue 27): the experiments' autotuner, λ warm-up, Matryoshka AuxK
    Fault(
        "autotune-convergence-damping-dropped",
        "objective/losses.py",
        "            gain = self.CONVERGENCE if error * self.rate < 0 else 1.0",
        "            gain = 1.0",
        ("test_synth_recipe_losses.py",),
    ),
    Fault(
        "autotune-ignores-start",
        "objective/losses.py",
        "        if self.steps - 1 >= self.start and error != 0:",
        "        if error != 0:",
        ("test_synth_recipe_losses.py", "test_synth_recipes.py"),
    ),
    Fault(
        "penalty-warmup-ignored",
        "train/member.py",
        "                lam = lam * losses.warmup_factor(step, cfg.penalty.warmup_steps)",
        "                pass",
        ("test_synth_recipes.py",),
    ),
    Fault(
        "matryoshka-auxk-full-residual",
        "objective/terms.py",
        "        residual_PND = (start - deltas.cumsum(0)).detach()",
        "        residual_PND = (start - deltas.sum(0)).detach().expand_as(deltas)",
        ("test_synth_recipe_losses.py",),
    ),
    Fault(
        "matryoshka-auxk-all-levels-dead",
        "objective/revival.py",
        "        level_dead[start:end] = dead_M[start:end]",
        "        level_dead[:] = dead_M",
        ("test_synth_recipe_losses.py",),
    ),
    # ------------------------------- Matryoshka fixed-level options (issue 27 item 5)
    Fault(
        "matryoshka-detach-inner-full-suffix-gradient",
        "kernels/prefix.py",
        "                torch.mul(err_ND, grad_P[j] * (-2.0 / n_tokens), out=grad_delta_PND[j])",
        "                torch.mul(acc_ND, -2.0 / n_tokens, out=grad_delta_PND[j])",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matryoshka-detach-inner-level-weight-dropped",
        "kernels/prefix.py",
        "                torch.mul(err_ND, grad_P[j] * (-2.0 / n_tokens), out=grad_delta_PND[j])",
        "                torch.mul(err_ND, -2.0 / n_tokens, out=grad_delta_PND[j])",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matryoshka-detach-inner-ignored",
        "objective/terms.py",
        "                tilt=self.tilt, detach_inner=self.detach_inner,",
        "                tilt=self.tilt,",
        ("test_matryoshka_levels.py", "test_matryoshka_levels_training.py"),
    ),
    Fault(
        "matryoshka-level-k-inner-not-detached",
        "objective/matryoshka.py",
        "        inner_ND = halves[0].detach() if detach_inner else halves[0]",
        "        inner_ND = halves[0]",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matryoshka-level-k-ignored",
        "objective/terms.py",
        "        if self.level_k is None:",
        "        if True:",
        ("test_matryoshka_levels.py", "test_matryoshka_levels_training.py"),
    ),
    Fault(
        "matryoshka-level-k-batch-selected-per-token",
        "activations/batchtopk.py",
        "        return matryoshka.level_code(latents, end, k, per_token=False)",
        "        return matryoshka.level_code(latents, end, k, per_token=True)",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matryoshka-level-k-ranked-past-the-prefix",
        "objective/matryoshka.py",
        "        key_E = values_E.detach().abs().masked_fill(latents.latent >= end, -math.inf)",
        "        key_E = values_E.detach().abs()",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matryoshka-level-k-rank-within-token-off-by-one",
        "objective/matryoshka.py",
        "            keep_E = rank_E < k",
        "            keep_E = rank_E <= k",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matryoshka-level-k-signed-ranking",
        "objective/matryoshka.py",
        "    key_NM = z_NM.detach().abs().masked_fill(~inside_M, -math.inf)",
        "    key_NM = z_NM.detach().masked_fill(~inside_M, -math.inf)",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "matched-l0-tolerance-ignored",
        "synthbench/bench.py",
        "    return all(abs(l0 - target) <= MATCH_TOLERANCE * target for l0 in l0s)",
        "    return True",
        ("test_synth_bench.py",),
    ),
    # reconstruction_tilt (TERM, losses.tilted_mean)
    Fault(
        "tilt-m-not-detached",
        "objective/losses.py",
        "    m = loss_N.detach().mean().clamp_min(",
        "    m = loss_N.mean().clamp_min(",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-not-unit-free",
        "objective/losses.py",
        "torch.logsumexp(loss_N / m * tilt, 0)",
        "torch.logsumexp(loss_N * tilt, 0)",
        ("test_tilted_loss.py",),
        also=(
            ("objective/losses.py", "    return m / tilt * log_mean", "    return log_mean / tilt"),
        ),
    ),
    Fault(
        "tilt-sum-not-mean",
        "objective/losses.py",
        " - math.log(loss_N.numel())",
        "",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-ignored-plain",
        "objective/terms.py",
        "            if self.tilt:  # build_objective refused",
        "            if False:  # build_objective refused",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-ignored-matryoshka",
        "objective/terms.py",
        "                tilt=self.tilt, detach_inner=self.detach_inner,",
        "                detach_inner=self.detach_inner,",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-matryoshka-levels-pooled",
        "objective/matryoshka.py",
        "        levels.append(tilted_mean(token_squared_errors(r_ND, pred_ND), tilt))\n"
        "        sum_ND = sum_ND + delta_ND\n"
        "    return torch.stack(levels).mean()",
        "        levels.append(token_squared_errors(r_ND, pred_ND))\n"
        "        sum_ND = sum_ND + delta_ND\n"
        "    return tilted_mean(torch.cat(levels), tilt)",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-matryoshka-level-is-its-block",
        "objective/matryoshka.py",
        "        sum_ND = sum_ND + delta_ND",
        "        sum_ND = delta_ND",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-hierarchical-accepted",
        "objective/terms.py",
        '    if reconstruction_tilt and activation.overrides("reconstruction_loss"):',
        "    if False:",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-clt-accepted",
        "train/member_config.py",
        "        if self.reconstruction_tilt and not isinstance(self.sae, SAEConfig):",
        "        if False:",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-latent-parallel-accepted",
        "objective/sharded.py",
        "        if reconstruction_tilt:  # each token's error",
        "        if False:  # each token's error",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "tilt-recipe-dropped",
        "train/presets.py",
        '    return {**entry, "reconstruction_tilt": float(tilt)} if tilt else entry',
        "    return entry",
        ("test_tilted_loss.py",),
    ),
    # the level options composed with the tilt (test_matryoshka_levels.py)
    Fault(
        "tilt-path-ignores-detach-inner",
        "objective/matryoshka.py",
        "        pred_ND = (sum_ND.detach() if detach_inner else sum_ND) + delta_ND",
        "        pred_ND = sum_ND + delta_ND",
        ("test_matryoshka_levels.py",),
    ),
    Fault(
        "level-k-path-ignores-tilt",
        "objective/matryoshka.py",
        "        total = total + tilted_reconstruction_loss(r_ND, pred_ND, tilt)",
        "        total = total + tilted_reconstruction_loss(r_ND, pred_ND, 0.0)",
        ("test_matryoshka_levels.py",),
    ),
    # ------------------------------------- frequency-sorted Matryoshka levels (issue 27 item 5)
    Fault(
        "sort-ascending",
        "objective/matryoshka.py",
        "    return torch.sort(counts_M, descending=True, stable=True).indices",
        "    return torch.sort(counts_M, descending=False, stable=True).indices",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-after-the-wrong-step",
        "train/member.py",
        "        if (step + 1) % self.sort_every == 0:",
        "        if step % self.sort_every == 0:",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-counts-kept-across-sorts",
        "train/member.py",
        "            self.fire_counts.zero_()\n",
        "",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-counts-of-one-rank",
        "train/member.py",
        'self.comm.all_reduce(per_latent.contiguous(), "sum", "firing counts")',
        "per_latent",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-activation-tensors-left",
        "model/latent_order.py",
        ' + [f"activation.{k}" for k, v in act.items() if v.dim()]',
        "",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-adam-moments-left",
        "train/member.py",
        "                    value.copy_(value.index_select(0, perm))",
        "                    pass",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-dead-counters-left",
        "train/member.py",
        "        self.tokens_since_fired = before.index_select(0, perm)",
        "        self.tokens_since_fired = before.clone()",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-dead-columns-not-renamed",
        "objective/revival.py",
        "        self.columns = inverse_M[self.columns].sort().values",
        "        pass",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    Fault(
        "sort-counts-not-resumed",
        "train/member.py",
        '            self.fire_counts = tensors["fire_counts"].to(self.device)',
        "            self.fire_counts.zero_()",
        ("test_member_sort.py", "test_sae_latent_order.py", "test_matryoshka.py"),
    ),
    # LISTA encoder steps (saekit.model.lista, sae.encoder_steps)
    Fault(
        "lista-no-carry",
        "model/lista.py",
        "        pre_NM = as_dense(c) + encoder_preacts(",
        "        pre_NM = 0 * as_dense(c) + encoder_preacts(",
        ("test_lista.py",),
    ),
    Fault(
        "lista-residual-without-bdec",
        "model/lista.py",
        "view.W_enc, view.b_enc, reconstruct(c))",
        "view.W_enc, view.b_enc, reconstruct(c) - view.b_dec)",
        ("test_lista.py",),
    ),
    Fault(
        "lista-one-step-fewer",
        "model/lista.py",
        "    for _ in range(steps - 1):",
        "    for _ in range(steps - 2):",
        ("test_lista.py",),
    ),
    Fault(
        "lista-steps-detached",
        "model/lista.py",
        "        c = enc.latents",
        "        c = as_dense(enc.latents).detach()",
        ("test_lista.py",),
    ),
    Fault(
        "lista-exported",
        "interop/portable.py",
        "    if sae.cfg.encoder_steps > 1:",
        "    if False:",
        ("test_lista.py",),
    ),
    Fault(
        "lista-transcoder-accepted",
        "model/config.py",
        "            if self.transcoder:  # the residual x − x̂",
        "            if False:  # the residual x − x̂",
        ("test_lista.py",),
    ),
    Fault(
        "lista-latent-parallel-accepted",
        "train/mesh.py",
        "            if isinstance(s.sae, SAEConfig) and s.sae.encoder_steps > 1:",
        "            if False:",
        ("test_latent_clt.py",),
    ),
    Fault(
        "lista-calibration-one-pass",
        "eval/calibrate.py",
        "    calibration = first if steps == 1 else _search(sae, fresh, max_tokens, first)",
        "    calibration = first",
        ("test_calibrate.py",),
    ),
    Fault(
        "lista-calibration-unbracketed",
        "eval/calibrate.py",
        "        if not low < theta < high:",
        "        if False:",
        ("test_calibrate.py",),
    ),
    Fault(
        "lista-calibration-in-training-mode",
        "eval/calibrate.py",
        "    was_training = sae.training\n    sae.eval()\n",
        "    was_training = sae.training\n",
        ("test_calibrate.py",),
    ),
    # review of item 5's options (the numerical trap, the bench's option rows)
    Fault(
        "tilt-t-over-m-overflows",
        "objective/losses.py",
        "torch.logsumexp(loss_N / m * tilt, 0)",
        "torch.logsumexp(loss_N * (tilt / m), 0)",
        ("test_tilted_loss.py",),
    ),
    Fault(
        "bench-option-difference-unpaired",
        "synthbench/options.py",
        "    diffs = [a - b for a, b in zip(option, base, strict=True)]",
        "    diffs = [a - statistics.mean(base) for a in option]",
        ("test_synth_options.py",),
    ),
    Fault(
        "bench-decreasing-k-floored",
        "synthbench/options.py",
        "    return [max(1, -(-k * j // n_levels)) for j in range(1, n_levels + 1)]",
        "    return [max(1, k * j // n_levels) for j in range(1, n_levels + 1)]",
        ("test_synth_options.py",),
    ),
]

# ------------------------------------------------------------------------------ machinery


def anchor_problems(fault: Fault, root: Path) -> list[str]:
    problems = []
    for file, old, _ in fault.substitutions():
        path = root / "saekit" / file
        if not path.is_file():
            problems.append(f"{file}: no such file")
            continue
        count = path.read_text().count(old)
        if count != 1:
            what = "missing" if count == 0 else f"ambiguous ({count} matches)"
            problems.append(f"{file}: anchor {what}: {old.splitlines()[0].strip()!r}")
    return problems


def copy_src(dest: Path, fault: Fault | None) -> Path:
    src = dest / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if fault is not None:
        for file, old, new in fault.substitutions():
            path = src / "saekit" / file
            text = path.read_text()
            assert text.count(old) == 1, (fault.name, file)
            path.write_text(text.replace(old, new))
    return src


def env_for(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_import(src: Path) -> None:
    """The temp copy, not the editable install, must be what ``import saekit`` finds."""
    out = subprocess.run(
        [sys.executable, "-c", "import saekit; print(saekit.__file__)"],
        env=env_for(src),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = Path(out.stdout.strip() or "?").resolve()
    expected = (src / "saekit" / "__init__.py").resolve()
    if found != expected:
        sys.exit(
            f"mutation_check: saekit imports from {found}, not the copy {expected}\n{out.stderr}"
        )


def ordered_tests(first: tuple[str, ...], only: list[str] | None) -> list[str]:
    """The fault's ``first`` files, then the rest (``--tests`` paths, or every test file with
    the slow end-to-end one last)."""
    if only:
        head = [p for name in first for p in only if Path(p).name == name]
        return head + [p for p in only if p not in head]
    # tests/ mirrors src/ (tests/<room>/test_*.py); a fault names its files by base name
    where = {
        p.name: str(p.relative_to(REPO))
        for p in sorted(TESTS.rglob("test_*.py"))
        if p.name not in REAL_LIBRARIES
    }
    every = sorted(where)
    head = [f for f in first if f in every]
    slow = [f for f in every if f in SLOW_LAST and f not in head]
    rest = [f for f in every if f not in head and f not in slow]
    return [where[f] for f in head + rest + slow]


FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)")


def run_pytest(
    src: Path, tests: list[str], stop_first: bool, timeout: float
) -> tuple[bool, float, list[str], str]:
    """(suite passed, seconds, failing test ids, output)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    if stop_first:
        cmd.insert(4, "-x")
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, env=env_for(src), cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return False, time.monotonic() - start, [f"(timeout after {timeout:.0f} s)"], out
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    failing = [m.group(2) for line in output.splitlines() if (m := FAILED_LINE.match(line))]
    if proc.returncode == 5:  # nothing collected
        return False, seconds, ["(no tests collected)"], output
    if proc.returncode != 0 and not failing:
        failing = [f"(pytest exit {proc.returncode})"]
    return proc.returncode == 0, seconds, failing, output


def run_fault(
    src: Path, fault: Fault, only: list[str] | None, timeout: float
) -> tuple[bool, float, list[str]]:
    """(suite passed, seconds, failing test ids) with the fault applied in ``src``: the fault's
    own test files first, on their own (most faults die there, without collecting the whole
    suite), then, only if they pass, every other file."""
    tests = ordered_tests(fault.first, only)
    head = [p for p in tests if Path(p).name in fault.first]
    seconds = 0.0
    if head:
        passed, seconds, failing, _ = run_pytest(src, head, True, timeout)
        if not passed:
            return passed, seconds, failing
    rest = [p for p in tests if p not in head]
    passed, more, failing, _ = run_pytest(src, rest, True, timeout)
    return passed, seconds + more, failing


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    header = ("fault", "file", "result", "seconds", "first failing test")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--faults", nargs="+", metavar="NAME", help="run only these faults")
    p.add_argument("--tests", nargs="+", metavar="PATH", help="test paths instead of tests/")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    p.add_argument(
        "--anchors", action="store_true", help="check every anchor matches once, run nothing"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    p.add_argument("--keep", action="store_true", help="keep the temp directories")
    args = p.parse_args(argv)

    if args.list:
        for f in FAULTS:
            print(f"{f.name:40s} {', '.join(s[0] for s in f.substitutions())}")
        return 0
    names = [f.name for f in FAULTS]
    assert len(set(names)) == len(names), "duplicate fault names"
    chosen = FAULTS
    if args.faults:
        unknown = sorted(set(args.faults) - set(names))
        if unknown:
            print(f"mutation_check: unknown fault(s) {unknown}; --list shows them", file=sys.stderr)
            return 2
        chosen = [f for f in FAULTS if f.name in args.faults]

    bad_anchors = {f.name: anchor_problems(f, SRC) for f in chosen}
    for name, problems in bad_anchors.items():
        for problem in problems:
            print(f"mutation_check: {name}: {problem}", file=sys.stderr)
    if args.anchors:
        test_names = {p.name for p in TESTS.rglob("test_*.py")}
        for f in chosen:
            for name in f.first:
                if name not in test_names:
                    bad_anchors[f.name].append(f"first test file {name} not found")
                    print(f"mutation_check: {f.name}: no test file {name}", file=sys.stderr)
        print(f"{len(chosen)} faults, {sum(map(bool, bad_anchors.values()))} with anchor problems")
        return 2 if any(bad_anchors.values()) else 0
    work = Path(tempfile.mkdtemp(prefix="saekit-mutation-"))
    try:
        # baseline: the unmodified copy must pass, or the results mean nothing
        base_src = copy_src(work / "baseline", None)
        check_import(base_src)
        tests = ordered_tests((), args.tests)
        print(f"baseline: pytest {' '.join(tests)}", flush=True)
        ok, seconds, failing, output = run_pytest(base_src, tests, False, args.timeout)
        rows = [("(baseline)", "-", "pass" if ok else "FAIL", f"{seconds:.0f}", "")]
        if not ok:
            print(output[-4000:])
            print(
                f"\nmutation_check: the baseline fails ({len(failing)} failing); fix these first:"
            )
            for t in failing:
                print(f"  {t}")
            print_table(rows)
            return 2 if any(bad_anchors.values()) else 1

        exit_code = 0
        for fault in chosen:
            files = ", ".join(s[0] for s in fault.substitutions())
            problems = bad_anchors[fault.name]
            if problems:
                rows.append((fault.name, files, "ANCHOR", "-", "; ".join(problems)))
                print(f"{fault.name}: ANCHOR {'; '.join(problems)}", file=sys.stderr, flush=True)
                exit_code = 2
                continue
            src = copy_src(work / fault.name, fault)
            check_import(src)
            passed, seconds, failing = run_fault(src, fault, args.tests, args.timeout)
            result = "SURVIVED" if passed else "killed"
            if passed:
                exit_code = max(exit_code, 1)
            rows.append(
                (fault.name, files, result, f"{seconds:.0f}", failing[0] if failing else "")
            )
            print(f"{fault.name}: {result} ({seconds:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(work / fault.name, ignore_errors=True)
        print()
        print_table(rows)
        survived = [r[0] for r in rows if r[2] == "SURVIVED"]
        if survived:
            print(f"\nSURVIVED: {', '.join(survived)}")
        return exit_code
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
