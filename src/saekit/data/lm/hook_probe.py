"""``saekit hooks``: a model's hook points with their shapes, from its config alone.

The model is built on the meta device (:func:`saekit.data.lm.models.meta_model`: parameters have
shapes but no storage), so only config.json is read and nothing is initialised; one forward
pass on meta token ids ``[B, T]`` records what every module receives (``NAME:input``) and
returns (``NAME``). The pass gets no attention mask: transformers' mask helpers read mask values
(``.item()``), which meta tensors do not have, and an all-ones mask changes no shape. The probe
needs a model of its own (it clears the config's padding id).

Suggestions for an unknown hook name: :mod:`saekit.data.lm.hook_names`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.data.lm.harvester import first_tensor, hook_input

PROBE_BATCH, PROBE_TOKENS = 2, 7
"""Shape of the probe's token ids; these sizes print as B and T in the first two dimensions."""


@dataclass(frozen=True)
class HookShape:
    """One module: its name and the shapes of its first input and output (None: not a tensor,
    or the module never ran in the probe's forward pass)."""

    module: str
    output: tuple[int, ...] | None
    input: tuple[int, ...] | None


def _shape(read, *values) -> tuple[int, ...] | None:
    try:
        tensor = read(*values)
    except (TypeError, IndexError):
        return None
    return tuple(tensor.shape) if isinstance(tensor, Tensor) else None


@torch.no_grad()
def probe_hook_shapes(model: nn.Module) -> tuple[list[HookShape], str | None]:
    """Every named module's input and output shapes from one forward pass on meta token ids,
    in module order; and the error of that pass if it failed (then shapes seen before it)."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def record(_m, args, kwargs, output, name=name):
            if name not in seen:  # a module called twice keeps its first call
                seen[name] = (
                    _shape(first_tensor, output),
                    _shape(hook_input, args, kwargs),
                )

        handles.append(module.register_forward_hook(record, with_kwargs=True))
    config = getattr(model, "config", None)
    if getattr(config, "pad_token_id", None) is not None:
        # transformers looks for padding in the ids to warn about a missing mask (.item());
        # a model built for this probe only can forget its padding id
        config.pad_token_id = None
    device = next((p.device for p in model.parameters()), torch.device("meta"))
    ids = torch.zeros(PROBE_BATCH, PROBE_TOKENS, dtype=torch.long, device=device)
    error = None
    try:
        model(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - report what was seen and why the rest is missing
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    finally:
        for handle in handles:
            handle.remove()
    rows = [
        HookShape(name, *seen.get(name, (None, None))) for name, _ in model.named_modules() if name
    ]
    return rows, error


def format_shape(shape: tuple[int, ...] | None) -> str:
    """``[B, T, 576]``: the probe's batch and token sizes named where they lead the shape."""
    if shape is None:
        return "-"
    dims = [str(n) for n in shape]
    if len(shape) >= 1 and shape[0] == PROBE_BATCH:
        dims[0] = "B"
    if len(shape) >= 2 and shape[1] == PROBE_TOKENS:
        dims[1] = "T"
    return "[" + ", ".join(dims) + "]"


def format_hook_table(rows: list[HookShape], pattern: str | None = None) -> str:
    """One line per module whose name matches ``pattern`` (a regular expression, searched)."""
    if pattern is not None:
        try:
            wanted = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"--grep {pattern!r} is not a regular expression: {exc}") from None
        rows = [r for r in rows if wanted.search(r.module)]
    if not rows:
        return f"no module matches {pattern!r}"
    width = max(len(r.module) for r in rows)
    out_width = max(len(format_shape(r.output)) for r in rows)
    lines = [f"{'hook point':<{width}}  {'output':<{out_width}}  :input"]
    for r in rows:
        lines.append(
            f"{r.module:<{width}}  {format_shape(r.output):<{out_width}}  {format_shape(r.input)}"
        )
    return "\n".join(lines)
