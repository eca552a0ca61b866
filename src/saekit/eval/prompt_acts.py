"""A model's activations at one hook for a list of short prompts: one vector per prompt, read at
a given position, at the last real token, or averaged over the real tokens.

The thin adapter between the judge-free evaluations (:mod:`saekit.eval.absorption`,
:mod:`saekit.eval.sparse_probing`) and the data layer's hooks (:func:`saekit.data.hf.capture`):
if the data layer moves, only this module follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from saekit.data.lm.harvester import HookPoint, capture, model_device

Pool = Literal["position", "last", "mean"]


def pad_batch(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] and their attention mask (a causal model's earlier positions do
    not see the padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, : len(prompt)] = 1
    return ids, mask


@torch.no_grad()
def prompt_activations(
    model: nn.Module,
    hook: str,
    prompts: Sequence[Sequence[int]],
    *,
    pool: Pool = "last",
    positions: Sequence[int] | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
    forward_kwargs: dict | None = None,
) -> Tensor:
    """[len(prompts), d] float32 activations at ``hook``: at ``positions[i]`` of prompt i
    (``pool="position"``), at its last token, or the mean over its tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if pool == "position" and (positions is None or len(positions) != len(prompts)):
        raise ValueError("pool='position' needs one position per prompt")
    point = HookPoint.parse(hook)
    dev = model_device(model)
    model.eval()
    kwargs = {"use_cache": False} if forward_kwargs is None else forward_kwargs
    out: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id)
        with capture(model, [point], stop_after_last=True) as captured:
            try:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
            except Exception as exc:  # the capture's early stop, or a real failure
                if point not in captured:
                    raise exc
        act_BTd = captured[point].float().cpu()
        lengths = mask.sum(1)
        if pool == "mean":
            out.append((act_BTd * mask[..., None]).sum(1) / lengths[:, None])
            continue
        if pool == "position":
            assert positions is not None
            index = torch.as_tensor(list(positions[start : start + batch_size]))
            index = torch.where(index < 0, lengths + index, index)
        else:
            index = lengths - 1
        out.append(act_BTd[torch.arange(len(chunk)), index])
    return torch.cat(out)
