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
or more hooks must be told. A dictionary over N hooks names them as lists instead:
``data.input_hooks`` (a crosscoder's S sources; a cross-layer transcoder's L inputs, layer by
layer) and ``data.target_hooks`` (the CLT's L targets, in the same order). The batch is then
[inputs | targets], every input's columns, then every target's (saekit.model.clt,
saekit.model.crosscoder); a hook may be both an input and a target.
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
    names: Sequence[str],
    hook: str | None,
    target_hook: str | None,
    where: str,
    input_hooks: Sequence[str] | None = None,
    target_hooks: Sequence[str] | None = None,
) -> list[str]:
    """The hooks a run trains on, ``[input]`` or ``[input, target]`` (or ``input_hooks +
    target_hooks``), out of ``names`` (the hooks ``where``, a source's description, holds); see
    the module docstring for the rule."""
    if input_hooks is not None or target_hooks is not None:
        return _hook_lists(names, hook, target_hook, where, input_hooks, target_hooks)
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


def _hook_lists(
    names: Sequence[str],
    hook: str | None,
    target_hook: str | None,
    where: str,
    input_hooks: Sequence[str] | None,
    target_hooks: Sequence[str] | None,
) -> list[str]:
    """``input_hooks + target_hooks``, each checked (module docstring)."""
    if input_hooks is None:
        raise ValueError("data.target_hooks needs data.input_hooks (one input per target)")
    if hook is not None or target_hook is not None:
        raise ValueError(
            "set data.input_hooks (+ data.target_hooks) or data.hook (+ data.target_hook), not both"
        )
    inputs = [str(HookPoint.parse(h)) for h in input_hooks]
    targets = [str(HookPoint.parse(h)) for h in target_hooks or []]
    if not inputs:
        raise ValueError("data.input_hooks is empty")
    if target_hooks is not None and len(targets) != len(inputs):
        raise ValueError(
            f"data.target_hooks names {len(targets)} hooks and data.input_hooks {len(inputs)}: "
            "a cross-layer transcoder has one target per input layer"
        )
    for field, group in (("input_hooks", inputs), ("target_hooks", targets)):
        if len(set(group)) != len(group):
            raise ValueError(f"data.{field} names a hook twice: {group}")
        for name in group:
            if name not in names:
                raise ValueError(
                    f"data.{field}: {name!r} is not one of the hooks {names} of {where}"
                )
    return inputs + targets


def hook_groups(
    selected: Sequence[str], input_hooks: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(inputs, targets) of a selection: the first ``len(input_hooks)`` hooks and the rest, or
    (without input_hooks) the first hook and the target after it."""
    n_inputs = len(input_hooks) if input_hooks else 1
    return list(selected[:n_inputs]), list(selected[n_inputs:])
