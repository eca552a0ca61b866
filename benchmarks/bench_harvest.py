"""Harvesting throughput on a randomly initialised mid-size GPT-2 (CPU by default).

Prints a markdown table: tokens/s harvesting one hook with and without the early stop, and
(second table) a toy SAE training loop fed by the harvester with and without overlapping the
model forward (``Harvester.stream(prefetch=2)``, a background thread).

    python benchmarks/bench_harvest.py [--layers 6] [--d-model 384] [--batches 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from saekit.data.lm.harvester import Harvester, TokenFilter


def build_model(layers: int, d_model: int, context: int, device: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers, n_embd=d_model, n_head=d_model // 64, n_positions=context, vocab_size=50257
    )
    return GPT2LMHeadModel(config).to(device).eval()


def token_batches(n: int, batch: int, context: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50257, (batch, context), generator=g).to(device) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def harvest_rate(harvester: Harvester, batches: list[torch.Tensor], device: str) -> float:
    """Best of two timed passes (the machine may be shared), after a warm-up batch."""
    harvester(batches[0])
    best = 0.0
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        for ids in batches:
            harvester(ids)
        sync(device)
        best = max(best, sum(b.numel() for b in batches) / (time.perf_counter() - start))
    return best


class ToySAE(torch.nn.Module):
    """TopK SAE step stand-in: dense encoder, top-k, dense decoder."""

    def __init__(self, d: int, expansion: int = 8, k: int = 32) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(d, expansion * d)
        self.dec = torch.nn.Linear(expansion * d, d)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.enc(x))
        top = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        return self.dec(z)


def train_rate(harvester: Harvester, batches, hook: str, d: int, prefetch: int, device: str):
    sae = ToySAE(d).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    sync(device)
    start = time.perf_counter()
    n = 0
    for acts in harvester.stream(batches, prefetch=prefetch):
        x = acts[hook]
        for chunk in x.split(512):
            loss = (sae(chunk) - chunk).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = build_model(args.layers, args.d_model, args.context, args.device)
    batches = token_batches(args.batches, args.batch, args.context, args.device)
    keep_all = TokenFilter(exclude_bos=False)
    print(
        f"GPT-2 random init: {args.layers} layers, d={args.d_model}, context {args.context},"
        f" batch {args.batch}, {args.batches} batches, device {args.device},"
        f" torch threads {torch.get_num_threads()}\n"
    )
    print("| hook | early stop | tokens/s | speed-up |")
    print("|---|---|---:|---:|")
    for layer in (1, args.layers // 2, args.layers - 1):
        hook = f"transformer.h.{layer}"
        full = harvest_rate(
            Harvester(model, hook, token_filter=keep_all, early_stop=False), batches, args.device
        )
        stopped = harvest_rate(Harvester(model, hook, token_filter=keep_all), batches, args.device)
        print(f"| `{hook}` | no | {full:,.0f} | 1.00x |")
        print(f"| `{hook}` | yes | {stopped:,.0f} | {stopped / full:.2f}x |")

    hook = f"transformer.h.{args.layers // 2}"
    harvester = Harvester(model, hook, token_filter=keep_all)
    harvester(batches[0])
    print("\n| harvest + toy TopK SAE steps (8x, k=32, batch 512) | tokens/s | speed-up |")
    print("|---|---:|---:|")
    serial = overlapped = 0.0
    for _ in range(2):  # interleaved, best of two
        serial = max(serial, train_rate(harvester, batches, hook, args.d_model, 0, args.device))
        overlapped = max(
            overlapped, train_rate(harvester, batches, hook, args.d_model, 2, args.device)
        )
    print(f"| serial | {serial:,.0f} | 1.00x |")
    print(f"| overlapped (prefetch=2 thread) | {overlapped:,.0f} | {overlapped / serial:.2f}x |")


if __name__ == "__main__":
    main()
