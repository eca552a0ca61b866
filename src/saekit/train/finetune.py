"""End-to-end fine-tuning of a saved SAE (or transcoder) spliced into its frozen model: the short
KL + MSE fine-tune of Karvonen, "Revisiting End-to-End Sparse Autoencoder Training: A Short
Finetune Is All You Need" (arXiv 2503.17272), which closes 20-50% of the CE gap of an
MSE-trained SAE.

Loss per step, over the positions the model's token filter keeps (the ones an SAE trains on)::

    L = α · KL(p_clean ‖ p_spliced) + (1 − α) · β · MSE(x, x̂)

KL: the mean over predicting positions of the next-token KL with the SAE's reconstruction
spliced in at its hook (a transcoder: its prediction in place of the target hook's output);
MSE: the mean over spliced positions of ‖x − x̂‖² (a transcoder: of the target). β balances the
two terms as the paper does, so that hyperparameters carry over despite their different scales:
β = KL / MSE of the first batch, fixed for the run. α = 0.5 (``--kl-weight``); α = 0 is plain
reconstruction training on the same tokens (the test's baseline). The learning rate decays
linearly to 0 over the steps (the paper's fine-tune schedule). The model is frozen: only the
SAE's parameters get gradients.

Documents: the SAE's own held-out rule. An SAE whose cfg.json records its training documents
(``metadata.training_data``) fine-tunes on those and is scored on the ones it held out; without
a record the first ``held_out_docs`` documents are held out (as online training holds out the
leading documents) and the rest are trained on.

Resumable: every ``checkpoint_every`` steps the SAE is saved to ``out`` and the step, β and the
optimiser state to ``out/finetune_state.pt``; ``resume`` continues from them, skipping the
batches already used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.data.lm.harvester import HookPoint, TokenFilter, capture, model_device, unpack_batch
from saekit.eval.splice import SpliceResult, patch_activation, splice_eval
from saekit.model.sae import SAE

STATE_FILE = "finetune_state.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int
    lr: float = 1e-4
    kl_weight: float = 0.5
    """α of the module docstring."""
    checkpoint_every: int = 50


@dataclass(frozen=True)
class FinetuneResult:
    before: SpliceResult
    after: SpliceResult
    steps: int
    mse_scale: float
    """β."""
    history: list[dict[str, float]]
    """Per step: loss, kl, mse."""

    @property
    def ce_gap_closed(self) -> float:
        """The fraction of the spliced-in CE gap (CE_sae − CE_clean) the fine-tune closed."""
        gap = self.before.ce_sae - self.before.ce_clean
        return (self.before.ce_sae - self.after.ce_sae) / gap if gap else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ce_gap_closed": self.ce_gap_closed}


def kl_mse_loss(
    logits_clean: Tensor, logits_spliced: Tensor, target: Tensor, x_hat: Tensor, mse_scale: float,
    kl_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, KL, MSE) of the module docstring: logits [n, V] of the predicting positions,
    target and reconstruction [m, d] of the spliced ones."""
    logp_clean = F.log_softmax(logits_clean.float(), -1)
    logp = F.log_softmax(logits_spliced.float(), -1)
    # KL(p_clean ‖ p_spliced) = Σ_v p_clean (log p_clean − log p_spliced), mean over positions
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).mean()
    mse = (target.float() - x_hat.float()).pow(2).sum(-1).mean()
    return kl_weight * kl + (1 - kl_weight) * mse_scale * mse, kl, mse


def _spliced_logits(
    model: nn.Module, sae: SAE, hook: HookPoint, source: HookPoint | None, batch: Any,
    token_filter: TokenFilter,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(clean logits, spliced logits) at the predicting positions, and (target, x̂) at the
    spliced ones, for one batch; gradients flow into ``sae`` only."""
    dev = model_device(model)
    ids, mask = unpack_batch(batch)
    ids = ids.to(dev)
    mask = None if mask is None else mask.to(dev)
    keep_BT = token_filter.mask(ids, mask)
    predict_BT = keep_BT.clone()
    predict_BT[:, -1] = False
    if mask is not None:
        predict_BT[:, :-1] &= mask[:, 1:].bool()
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[predict_BT]
    pairs: list[tuple[Tensor, Tensor]] = []
    with ExitStack() as stack:
        inputs = None
        if source is not None:
            inputs = stack.enter_context(capture(model, [source], stop_after_last=False))

        def edit(act_BTd: Tensor) -> Tensor:
            target = act_BTd[keep_BT]
            x = target if inputs is None else inputs[source][keep_BT]
            x_hat = sae(x.to(sae.W_dec.dtype)).x_hat
            pairs.append((target.detach(), x_hat))
            out = act_BTd.clone()
            out[keep_BT] = x_hat.to(act_BTd.dtype)
            return out

        stack.enter_context(patch_activation(model, hook, edit))
        spliced = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[predict_BT]
    (target, x_hat), = pairs  # fmt: skip
    return clean, spliced, target, x_hat


def finetune(
    model: nn.Module,
    sae: SAE,
    train_batches: Callable[[], Iterator[Any]],
    eval_batches: Callable[[], Iterator[Any]],
    config: FinetuneConfig,
    *,
    out: str | Path,
    token_filter: TokenFilter | None = None,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``sae`` in place (module docstring) on ``train_batches()`` and score it on
    ``eval_batches()`` before and after; saves it to ``out``."""
    out = Path(out)
    token_filter = token_filter or TokenFilter()
    hook = HookPoint.parse(sae.cfg.target_hook if sae.cfg.transcoder else sae.cfg.hook or "")
    source = HookPoint.parse(sae.cfg.hook) if sae.cfg.transcoder else None
    model.eval().requires_grad_(False)

    def score() -> SpliceResult:
        sae.eval()
        with torch.no_grad():
            return splice_eval(
                model, hook, lambda x: sae(x.to(sae.W_dec.dtype)).x_hat, eval_batches(),
                token_filter=token_filter, input_hook=source,
            )  # fmt: skip

    before = score()
    sae.train()
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / config.steps))
    start, mse_scale, history = 0, None, []
    state_path = out / STATE_FILE
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        sae.load_state_dict(SAE.load(out).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, mse_scale, history = int(state["step"]), float(state["mse_scale"]), state["history"]
    batches = train_batches()
    for _ in range(start):  # the batches the interrupted run already used
        next(batches)
    for step in range(start, config.steps):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the training documents ran out after {step} of {config.steps} steps")
        clean, spliced, target, x_hat = _spliced_logits(
            model, sae, hook, source, batch, token_filter
        )
        if mse_scale is None:  # β: the KL and MSE terms of equal size at the start
            with torch.no_grad():
                _, kl0, mse0 = kl_mse_loss(clean, spliced, target, x_hat, 1.0, 1.0)
            mse_scale = float(kl0 / mse0) if float(mse0) > 0 else 1.0
        loss, kl, mse = kl_mse_loss(clean, spliced, target, x_hat, mse_scale, config.kl_weight)
        kl, mse = kl.detach(), mse.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        record = {"loss": float(loss.detach()), "kl": float(kl), "mse": float(mse)}
        history.append(record)
        if progress is not None:
            progress(step + 1, record)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            sae.save(out)
            state = {
                "step": step + 1, "mse_scale": mse_scale, "history": history,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            }  # fmt: skip
            torch.save(state, state_path)
    after = score()
    return FinetuneResult(before, after, config.steps, mse_scale or float("nan"), history)
