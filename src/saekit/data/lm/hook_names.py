"""Hook names across model families: a model's blocks, and what to suggest for a name of
another family (``transformer.h.8`` on a Llama model, whose blocks are ``model.layers.N``)."""

from __future__ import annotations

import re

from torch import nn


def block_list(model: nn.Module) -> tuple[str, int] | None:
    """Name and length of the model's transformer blocks: its longest ModuleList (GPT-2
    ``transformer.h``, Llama ``model.layers``, BERT ``encoder.layer``)."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    if not lists:
        return None
    length, name = max(lists, key=lambda item: item[0])  # first of the longest
    return (name, length) if length else None


def family_hint(model: nn.Module, name: str) -> str:
    """A block name of another naming family (``transformer.h.8`` on a Llama model) mapped to
    this model's blocks (``model.layers.8``), keeping the part after the block if it exists;
    or, in the right family, the valid block indices."""
    found = re.fullmatch(r"(.+?)\.(\d+)((?:\..+)?)", name)
    blocks = block_list(model)
    if found is None or blocks is None:
        return ""
    prefix, index, rest = found.groups()
    blocks_name, n_blocks = blocks
    span = f"{blocks_name}.0 to {blocks_name}.{n_blocks - 1}"
    if int(index) >= n_blocks:
        return f"; this model's blocks are {span}"
    if prefix == blocks_name:
        return ""  # the right family and block: a typo after it, close matches say more
    guess = f"{blocks_name}.{index}{rest}"
    parts = ""
    if guess not in {n for n, _ in model.named_modules()}:
        guess = f"{blocks_name}.{index}"
        children = [n for n, _ in model.get_submodule(guess).named_children()]
        parts = f" (its parts: {', '.join(children)})" if rest and children else ""
    return f"; this model's blocks are {span}, not {prefix}.N: did you mean {guess}{parts}?"
