"""Hook names between saekit (Hugging Face module names), TransformerLens and sparsify.

saekit names a hook by module and side: ``transformer.h.8:input`` is what enters GPT-2's block
8 (the residual stream before it), ``model.layers.8`` what a Llama-style block returns.
TransformerLens (SAELens' ``hook_name``) names the same activations ``blocks.8.hook_resid_pre``
and ``blocks.8.hook_resid_post``; sparsify names the module whose *output* it reads, relative to
the model's ``base_model`` (``h.8`` for GPT-2, ``layers.8`` for Llama).
"""

from __future__ import annotations

import re

BLOCKS = {"gpt2": "transformer.h", "neox": "gpt_neox.layers", "llama": "model.layers"}
"""Model family → the module list of its blocks."""
PARTS = {
    "gpt2": {"mlp": "mlp", "attn": "attn"},
    "neox": {"mlp": "mlp", "attn": "attention"},
    "llama": {"mlp": "mlp", "attn": "self_attn"},
}
"""Model family → its blocks' MLP and attention modules (hook_mlp_out, hook_attn_out)."""
MLP_NORM = {"gpt2": "ln_2", "neox": "post_attention_layernorm", "llama": "post_attention_layernorm"}
"""Model family → the norm in front of the MLP (its output, the MLP's input: a transcoder's
input, TransformerLens' ``blocks.N.ln2.hook_normalized``)."""
_FAMILY_WORDS = (
    ("neox", ("pythia", "neox")),
    ("gpt2", ("gpt2",)),
    ("llama", ("llama", "qwen", "gemma", "mistral", "smollm", "olmo")),
)


def _split(hook: str) -> tuple[str, int, str, str] | None:
    """``transformer.h.8.mlp:input`` → (family, 8, "mlp", "input"); None for other names."""
    module, _, side = hook.partition(":")
    for family, blocks in BLOCKS.items():
        found = re.fullmatch(re.escape(blocks) + r"\.(\d+)((?:\.\w+)*)", module)
        if found is not None:
            return family, int(found.group(1)), found.group(2).lstrip("."), side or "output"
    return None


def transformer_lens_name(hook: str | None) -> str | None:
    """The TransformerLens name of a saekit hook (residual stream before and after a block, the
    MLP's and attention's outputs), or None where no mapping is known."""
    parts = _split(hook) if hook else None
    if parts is None:
        return None
    family, n, rest, side = parts
    if rest == "" and side == "input":
        return f"blocks.{n}.hook_resid_pre"
    if rest == "" and side == "output":
        return f"blocks.{n}.hook_resid_post"
    named = {module: part for part, module in PARTS[family].items()}
    if side == "output" and rest in named:
        return f"blocks.{n}.hook_{named[rest]}_out"
    if (rest, side) in ((PARTS[family]["mlp"], "input"), (MLP_NORM[family], "output")):
        return f"blocks.{n}.ln2.hook_normalized"
    return None


def model_family(model_name: str | None) -> str | None:
    """gpt2, neox or llama (Llama, Qwen, Gemma, Mistral: ``model.layers.N``) from a model's name."""
    lowered = (model_name or "").lower()
    for family, words in _FAMILY_WORDS:
        if any(word in lowered for word in words):
            return family
    return None


def hf_hook_name(tl_name: str | None, model_name: str | None) -> str | None:
    """The saekit hook of a TransformerLens name on a model of a known family, else None."""
    family = model_family(model_name)
    found = re.fullmatch(
        r"blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)", tl_name or ""
    )
    if family is None or found is None:
        return None
    blocks, n, what = BLOCKS[family], found.group(1), found.group(2)
    if what == "resid_pre":
        return f"{blocks}.{n}:input"
    if what == "resid_post":
        return f"{blocks}.{n}"
    return f"{blocks}.{n}.{PARTS[family][what.removesuffix('_out')]}"


def sparsify_hookpoint(hook: str | None) -> str:
    """The directory name sparsify gives the SAE of this hook: the module whose output it reads,
    relative to the base model (``transformer.h.8:input`` is ``h.7``'s output). Hooks with no
    such module (block 0's input, other inputs) keep their saekit name, ``:`` as ``.``."""
    if not hook:
        return "sae"
    parts = _split(hook)
    if parts is not None:
        family, n, rest, side = parts
        relative = BLOCKS[family].split(".", 1)[1]  # transformer.h → h
        if side == "output":
            return ".".join(filter(None, (f"{relative}.{n}", rest)))
        if rest == "" and n > 0:
            return f"{relative}.{n - 1}"
    return hook.replace(":", ".")
