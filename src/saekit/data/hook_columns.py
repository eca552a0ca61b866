"""How one batch carries the activations of N hook points, and which of them a run trains on.

Layout: a batch is ``[n_tokens, d_1 + ... + d_N]``, each hook's columns after the previous
hook's, in the order the hooks were named; the ``segments`` ``((name, width), ...)`` say where
each hook's columns are (a cache's manifest records them: saekit.data.cache.reading). An SAE's
stream is the 1-hook case and a transcoder's ``[input | target]`` the 2-hook case, so every
consumer of a flat batch keeps working; :func:`split_hooks` gives the per-hook parts.

A run trains on a selection of the hooks a source holds (:func:`selected_hooks`): ``data.hook``
alone picks one (an SAE), ``data.hook`` + ``data.target_hook`` an (input, target) pair (a
transcoder); with neither, a source of one hook gives an SAE and one of two hooks the transcoder
from the first to the second (the layout ``--hook H --target-hook T`` writes); a source of three
or more hooks must be told.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from saekit.data.lm.harvester import HookPoint

Segments = Sequence[tuple[str, int]]
"""``(hook name, width)`` per hook, in column order."""


def column_slices(segments: Segments) -> dict[str, slice]:
    """Each hook's columns of a batch laid out as ``segments``."""
    slices, start = {}, 0
    for name, width in segments:
        slices[name] = slice(start, start + width)
        start += width
    return slices


def split_hooks(batch: Tensor, segments: Segments) -> dict[str, Tensor]:
    """``{hook: [..., d_hook]}`` views of ``batch`` (``[..., sum of widths]``), in order."""
    width = sum(w for _, w in segments)
    if batch.shape[-1] != width:
        names = ", ".join(f"{name} ({w})" for name, w in segments)
        raise ValueError(f"batch width {batch.shape[-1]} != {width}, the widths of hooks {names}")
    return {name: batch[..., cols] for name, cols in column_slices(segments).items()}


def join_hooks(acts: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """``[n, sum of widths]``: the activations at ``names`` (harvester output), in that order."""
    return torch.cat([acts[name] for name in names], dim=-1)


def select_columns(segments: Segments, names: Sequence[str]) -> slice | Tensor:
    """The columns of ``names`` (in that order) in a batch laid out as ``segments``: a slice when
    they are adjacent and in order (indexing with it makes no copy), else an index tensor."""
    slices = column_slices(segments)
    unknown = [name for name in names if name not in slices]
    if unknown or not names:
        raise ValueError(f"hook(s) {unknown or names} not among the hooks {list(slices)}")
    chosen = [slices[name] for name in names]
    if all(a.stop == b.start for a, b in zip(chosen, chosen[1:], strict=False)):
        return slice(chosen[0].start, chosen[-1].stop)
    return torch.cat([torch.arange(s.start, s.stop) for s in chosen])


def selected_hooks(
    names: Sequence[str], hook: str | None, target_hook: str | None, where: str
) -> list[str]:
    """The hooks a run trains on, ``[input]`` or ``[input, target]``, out of ``names`` (the
    hooks ``where``, a source's description, holds); see the module docstring for the rule."""
    if hook is None:
        if target_hook is not None:
            raise ValueError("data.target_hook needs data.hook (the transcoder's input)")
        if len(names) <= 2:
            return list(names)
        raise ValueError(
            f"{where} holds {len(names)} hooks ({', '.join(names)}): set data.hook to train on one"
            " of them, or data.hook and data.target_hook for a transcoder from one to another"
        )
    chosen = [str(HookPoint.parse(hook))]
    if target_hook is not None:
        chosen.append(str(HookPoint.parse(target_hook)))
    for field, name in zip(("hook", "target_hook"), chosen, strict=False):
        if name not in names:
            raise ValueError(f"data.{field} {name!r} is not one of the hooks {names} of {where}")
    if len(chosen) == 2 and chosen[0] == chosen[1]:
        raise ValueError(f"data.hook and data.target_hook are the same hook {chosen[0]!r}")
    return chosen
