"""The pieces of ``gpu_bench.py`` that build SAEs and processes (kept apart to stay short)."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saekit.core.comm import LocalComm
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.config import AuxKRevival
from saekit.objective.matryoshka import sample_prefixes
from saekit.objective.terms import AuxK, Reconstruction, TermInputs

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _sae(kind: str, kernel: str, d: int, m: int, k: int, device) -> SAE:
    activation = {"kind": kind, "k": k, "kernel": kernel}
    return SAE(SAEConfig(d_in=d, d_sae=m, activation=activation), device=device)


def _loss(sae: SAE, x, dead, auxk: bool, prefixes=None, dead_cols=None):
    out = sae(x)
    inputs = TermInputs(sae, out, dead, torch.zeros((), device=x.device), prefixes, dead_cols)
    terms = [Reconstruction()] + ([AuxK(AuxKRevival())] if auxk else [])
    return out, sum(term(inputs) for term in terms)


def compare_paths(kind: str, kernel: str, auxk: bool, device, dtype) -> float:
    """Largest relative error, over the loss and the four gradients, of ``kernel`` against the
    reference path (dense autograd) on the same weights and data, half the latents dead."""
    d, m, k, n = 32, 256, 4, 96
    torch.manual_seed(0)
    fast = _sae(kind, kernel, d, m, k, device)
    ref = _sae(kind, "reference", d, m, k, device)
    with torch.no_grad():
        fast.b_dec.normal_()
        fast.W_enc.add_(0.3 * torch.randn_like(fast.W_enc))
    ref.load_state_dict(fast.state_dict())
    x = 2.0 * torch.randn(n, d, device=device, dtype=dtype) + 1.0
    dead = torch.arange(m, device=device) % 2 == 0
    worst = 0.0
    results = []
    for sae in (fast.train(), ref.train()):
        _, loss = _loss(sae, x, dead, auxk)
        grads = torch.autograd.grad(loss, [getattr(sae, p) for p in PARAMS])
        results.append([loss, *grads])
    for a, b in zip(*results, strict=True):
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        worst = max(worst, float(err))
    return worst


def _adam(params, device):
    try:  # fused Adam reads its step count on the device; CPU support came in torch 2.4
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4)


def make_training_step(device, d, m, k, n_tokens, kind, auxk, bf16):
    """One training step as the trainer runs it (forward, objective terms, backward, parallel
    gradient removal, Adam, renormalisation, BatchTopK's θ), on fixed data."""
    matryoshka = kind.startswith("matryoshka")
    activation = "batchtopk" if kind.endswith("batchtopk") else "topk"
    torch.manual_seed(0)
    sae = _sae(activation, "torch", d, m, k, device).train()
    x = 3.0 * torch.randn(n_tokens, d, device=device) + 1.0
    sae.init_from_data(x)
    opt = _adam(sae.parameters(), device)
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    if auxk:
        dead[::2] = True  # half the latents dead
    dead_cols = torch.nonzero(dead).reshape(-1)  # what revival.DeadSet hands AuxK
    gen = torch.Generator().manual_seed(0)

    def step():
        prefixes = sample_prefixes(m, 10, min_prefix=16, generator=gen) if matryoshka else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out, loss = _loss(sae, x, dead, auxk, prefixes, dead_cols)
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        sae.activation.after_step(out.encoding, LocalComm())

    return step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, backend: str, numel: int, port: int, out: str) -> None:
    dist.init_process_group(backend, f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t = torch.ones(numel, device=device)
    times = []
    for i in range(7):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - start)
    expected = 2.0**7  # each all_reduce doubles every entry
    if float(t[0]) != expected:
        raise AssertionError(f"all_reduce gave {float(t[0])}, expected {expected}")
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(sorted(times)[len(times) // 2]))
    dist.destroy_process_group()


def two_process_allreduce(backend: str, numel: int) -> float:
    """Median seconds of an all_reduce of ``numel`` fp32 between 2 processes (checked)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(_allreduce_worker, args=(backend, numel, _free_port(), out), nprocs=2)
        with open(out) as f:
            return float(f.read())
