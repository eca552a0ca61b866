"""Feature-report generation: tokens/s and peak RSS against the number of tokens read.

Each row runs in a fresh process (peak RSS is per process): the one pass of ``saekit report``
(SAE forward, reconstruction metrics, per-latent top-k contexts, uniform sample, histogram),
then building and writing the site. Memory should follow latents × (top-k + samples) × window,
not tokens: 10× the tokens should leave the peak RSS and the collected state unchanged.

Sources:

- ``synthetic``: the built-in synthetic activations (T = 1 "contexts"), an SAE on them;
- ``model``: a tiny random GPT-2 (3 layers, d = 64, vocabulary 300) run on random token
  contexts of 128 through the harvesting path (``lm_batches``: forward stopped at the hook).

    python benchmarks/bench_report.py [--tokens 100000 1000000] [--source synthetic model]
        [--d-sae 2048] [--latents 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.report.build import report_data
from saekit.report.collect import CollectConfig, collect_batches, lm_batches
from saekit.report.site import write_site


def synthetic_batches(n_tokens: int, d: int, batch: int):
    from saekit.data.synthetic.generator import SyntheticConfig, SyntheticData

    data = SyntheticData(SyntheticConfig(d=d, n_features=4 * d, mean_l0=8))
    for i in range(n_tokens // batch):
        x = data.batch(i, batch).x  # generated inside the timed pass, as a harvester's would be
        yield (
            x.view(batch, 1, d),
            torch.ones(batch, 1, dtype=torch.bool),
            torch.full((batch, 1), -1),
        )


def model_batches(n_tokens: int, context: int, batch: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from saekit.data.lm.harvester import TokenFilter
    from saekit.data.lm.models import HarvestSetup

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=300, n_positions=context)
    ).eval()
    hook = "transformer.h.2:input"
    setup = HarvestSetup(model, None, "causal-lm", hook, 1, TokenFilter(bos_token_id=1))
    g = torch.Generator().manual_seed(1)

    def contexts():
        for _ in range(n_tokens // (batch * context)):
            ids = torch.randint(2, 300, (batch, context), generator=g)
            ids[:, 0] = 1
            yield ids

    return model, lm_batches(setup, contexts())


def one_run(source: str, n_tokens: int, d_sae: int, latents: int) -> dict:
    """Runs in the child process: time the pass and the site, report peak RSS."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=d_sae, activation={"kind": "topk", "k": 16}))
    cfg = CollectConfig(top_k=20, samples=64)
    ids = torch.arange(latents)
    W_U, decode = None, None
    if source == "synthetic":
        batches = synthetic_batches(n_tokens, 64, 4096)
    else:
        model, batches = model_batches(n_tokens, 128, 32)
        W_U = model.get_output_embeddings().weight.detach()
        decode = str
    before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), time.process_time()
    collected = collect_batches(sae, batches, ids, cfg)
    pass_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    data = report_data(collected, sae, decode, {"sae": "bench"}, W_U=W_U)
    with tempfile.TemporaryDirectory() as tmp:
        write_site(data, Path(tmp) / "site")
    site_s = time.perf_counter() - start
    return {
        "tokens": collected.collector.n_tokens,
        "tok_s": collected.collector.n_tokens / pass_s,
        "tok_cpu_s": collected.collector.n_tokens / cpu_s,
        "before_mib": before_mib,
        "site_s": site_s,
        "state_mib": collected.collector.nbytes() / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--source", nargs="+", default=["synthetic", "model"])
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--latents", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("SOURCE", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_run(args.child[0], int(args.child[1]), args.d_sae, args.latents)))
        return
    print(
        f"SAE d_in 64, d_sae {args.d_sae}, TopK k = 16; {args.latents} latents reported, top-k"
        f" 20, 64 samples, window 17; {args.threads} threads\n"
    )
    print(
        "| source | tokens | tokens/s (pass, wall) | tokens per CPU-second | site s |"
        " collected state MiB | peak RSS MiB before the pass | peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for source in args.source:
        for n in args.tokens:
            child = [sys.executable, __file__, "--child", source, str(n)]
            child += ["--d-sae", str(args.d_sae), "--latents", str(args.latents)]
            child += ["--threads", str(args.threads)]
            r = json.loads(subprocess.check_output(child, text=True).strip().splitlines()[-1])
            print(
                f"| {source} | {r['tokens']:,} | {r['tok_s']:,.0f} | {r['tok_cpu_s']:,.0f} |"
                f" {r['site_s']:.1f} | {r['state_mib']:.2f} | {r['before_mib']:,.0f} |"
                f" {r['peak_rss_mib']:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
