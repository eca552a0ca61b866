"""``saekit eval``: a saved SAE's reconstruction metrics and, with a causal LM, the model's CE and
KL with the SAE spliced in (:mod:`saekit.eval.splice`).

Data: ``--cache`` alone reads the cache's held-out shard (reconstruction only); ``--model`` with
``--dataset``/``--text-file`` runs the model on those documents in dataset order.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from saekit.eval.metrics import MetricAccumulator
from saekit.sae import SAE


def text_documents(args: argparse.Namespace) -> Iterator[str]:
    """The documents named by --dataset / --text-file and their options, in dataset order."""
    from saekit.data.lm_source import documents

    if not (args.dataset or args.text_file):
        raise ValueError("give the documents: --dataset ID|PATH or --text-file PATH")
    return documents(
        dataset=args.dataset,
        text_file=args.text_file,
        split=args.split or "train",
        config_name=args.dataset_config,
        field=args.text_field or "text",
        streaming=not args.no_streaming,
    )


def evaluate_saved(args: argparse.Namespace) -> dict[str, Any]:
    """The report of ``saekit eval`` (printed by :func:`format_eval`)."""
    sae = SAE.load(args.sae, device=args.device)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    hook = args.hook or sae.cfg.hook
    if not hook:
        raise ValueError(f"{args.sae}/cfg.json records no hook point: pass --hook")
    if not (args.model or args.cache):
        raise ValueError(
            "give --model with --dataset or --text-file (CE/KL and reconstruction) or --cache"
            " (reconstruction only)"
        )
    acc = MetricAccumulator(d_in, d_sae, device=args.device)
    report: dict[str, Any] = {"sae": str(args.sae), "hook": hook}

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        out = sae(x.to(sae.W_dec.dtype))
        acc.add(x, out.x_hat, out.latents)
        return out.x_hat

    if args.model:
        _on_model(args, sae, hook, reconstruct, report)
    else:
        _on_cache(args, sae, hook, reconstruct, report)
    if int(acc.n) == 0:
        raise ValueError("no tokens were evaluated")
    result = acc.result()
    report.update(result.summary())
    report.update(d_in=d_in, d_sae=d_sae, l0_histogram=result.l0_histogram)
    return report


def _on_cache(
    args: argparse.Namespace,
    sae: SAE,
    hook: str,
    reconstruct: Callable[[Tensor], Tensor],
    report: dict[str, Any],
) -> None:
    from saekit.data.cache import ActivationCache
    from saekit.data.lm_source import held_out_batches

    cache = ActivationCache(args.cache)
    if cache.d != sae.cfg.d_in:
        raise ValueError(
            f"SAE d_in = {sae.cfg.d_in} but the cache {args.cache} has width {cache.d}"
        )
    if cache.hook != hook:
        print(f"saekit: warning: the cache holds hook {cache.hook}, not {hook}", file=sys.stderr)
    context_length = args.context_length or 128
    n_tokens = args.n_batches * args.batch_size * context_length
    for x in held_out_batches(cache, n_tokens, args.batch_size * context_length):
        reconstruct(x.to(args.device))
    report.update(cache=str(args.cache), model=cache.model)


def _on_model(
    args: argparse.Namespace,
    sae: SAE,
    hook: str,
    reconstruct: Callable[[Tensor], Tensor],
    report: dict[str, Any],
) -> None:
    from saekit.data.hf import Harvester, HookPoint, TokenFilter
    from saekit.data.models import activation_width, check_hook, forward_kwargs, load_lm
    from saekit.data.text import packing_token_ids, token_batches
    from saekit.eval.splice import splice_eval

    hook = str(HookPoint.parse(hook))
    check_hook(args.model, hook, args.model_class, args.local_files_only)
    docs = text_documents(args)
    model, tokenizer, kind = load_lm(
        args.model,
        args.model_dtype or "float32",
        args.device,
        args.local_files_only,
        args.model_class,
    )
    width = activation_width(model, hook, kind)
    if width != sae.cfg.d_in:
        raise ValueError(
            f"SAE d_in = {sae.cfg.d_in} but model {args.model} has width {width} at hook {hook}"
        )
    bos, _ = packing_token_ids(tokenizer, args.bos_token, args.eos_token)
    contexts = token_batches(
        docs,
        tokenizer,
        context_length=args.context_length or 128,
        batch_size=args.batch_size,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
    )
    token_filter = TokenFilter.from_tokenizer(
        tokenizer, bos_token_id=bos, exclude_bos=not args.keep_bos
    )
    report.update(model=args.model, model_class=kind, hook=hook)
    report.update(dataset=args.dataset or args.text_file)
    if kind != "causal-lm":
        print(
            f"saekit: note: CE/KL are next-token losses of a causal LM; {args.model} loads as"
            f" {kind}: reconstruction metrics only (--model-class causal-lm if it is one)",
            file=sys.stderr,
        )
        harvester = Harvester(
            model, hook, token_filter=token_filter, forward_kwargs=forward_kwargs(kind)
        )
        for batch in itertools.islice(contexts, args.n_batches):
            reconstruct(harvester(batch)[hook].to(args.device))
        return
    splice = splice_eval(
        model, hook, reconstruct, contexts, token_filter=token_filter, max_batches=args.n_batches
    )
    report.update({k: v for k, v in splice.to_dict().items() if k not in ("fvu", "n_tokens")})
    report["n_predicted_tokens"] = splice.n_tokens


def format_eval(r: dict[str, Any]) -> str:
    lines = [
        f"SAE          {r['sae']}  ({r['d_sae']} latents, d_in {r['d_in']}, hook {r['hook']})",
        f"tokens       {r['n_tokens']:,}" + _predicted(r),
        f"FVU          {r['fvu']:.4f}   explained variance {r['explained_variance']:.4f}",
        f"L0           {r['l0']:.2f}",
        f"dead         {r['dead_fraction']:.1%} of latents never fired on these tokens",
        f"dense        {r['dense_fraction']:.1%} of latents fired on > 10% of tokens",
    ]
    if "ce_clean" in r:
        lines += [
            f"CE clean     {r['ce_clean']:.4f}   with SAE {r['ce_sae']:.4f}   "
            f"zero-ablated {r['ce_zero']:.4f}   CE score {r['ce_score']:.4f}",
            f"KL with SAE  {r['kl_sae']:.4f}   zero-ablated {r['kl_zero']:.4f}   "
            f"KL score {r['kl_score']:.4f}",
        ]
    return "\n".join(lines)


def _predicted(r: dict[str, Any]) -> str:
    """CE/KL average over the spliced tokens that predict a real next token: fewer than the
    spliced ones (the last position of each context predicts nothing)."""
    if "n_predicted_tokens" not in r:
        return ""
    return f" spliced; CE/KL over the {r['n_predicted_tokens']:,} of them that predict a token"
