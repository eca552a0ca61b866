"""``saekit report`` against ``saekit cache`` on the same tiny model and text (issue 28).

Both commands run in one process (after one warm-up cache run, so imports and first-call costs
are out), alternately, ``--reps`` times: the cache, the report with the model forward in the
same thread as the SAE and the collector (``PREFETCH = 0``, as before issue 28), and the report
with the forward prefetched in a worker thread (``saekit.report.collect.PREFETCH``, the
default). Model: the tests' tiny GPT-2 (3 layers, d = 64, 64 positions), hook
``transformer.h.1:input``; text: 2,000 documents of 5-199 one-token words; SAE: TopK k = 8,
d_sae 512, 64 latents reported (the report's defaults otherwise); contexts of 64, 8 per batch.

    PYTHONPATH=src python benchmarks/report_vs_cache.py [--tokens 20000] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny_gpt2  # noqa: E402  (the tests' tiny model)

import saekit.report.collect as collect  # noqa: E402
from saekit.cli import main  # noqa: E402
from saekit.model.config import SAEConfig  # noqa: E402
from saekit.model.sae import SAE  # noqa: E402

HOOK = "transformer.h.1:input"


def tiny_lm(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<unk>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>"
    )
    make_tiny_gpt2().save_pretrained(root / "m")
    tokenizer.save_pretrained(root / "m")
    rng = random.Random(0)
    docs = [
        " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 200))) for _ in range(2000)
    ]
    (root / "docs.txt").write_text("\n\n".join(docs))
    cfg = SAEConfig(d_in=64, d_sae=512, activation={"kind": "topk", "k": 8}, hook=HOOK)
    SAE(cfg).save(root / "sae")


def tokens_per_second(argv: list[str], n_tokens: int) -> float:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"saekit {argv[0]} failed ({code})")
    return n_tokens / seconds


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="saekit-report-vs-cache-"))
    try:
        tiny_lm(root)
        common = ["--model", str(root / "m"), "--hook", HOOK, "--local-files-only"]
        common += ["--text-file", str(root / "docs.txt"), "--context-length", "64"]
        common += ["--batch-size", "8", "--max-tokens", str(args.tokens), "--no-progress"]
        cache = ["cache", *common, "--out", str(root / "c")]
        report = ["report", str(root / "sae"), *common, "--out", str(root / "r")]
        rows: dict[str, list[float]] = {"cache": [], "report, PREFETCH 0": []}
        rows[f"report, PREFETCH {collect.PREFETCH}"] = []
        default = collect.PREFETCH
        tokens_per_second(cache, args.tokens)  # warm-up
        for _ in range(args.reps):
            for name in rows:
                shutil.rmtree(root / "c", ignore_errors=True)
                shutil.rmtree(root / "r", ignore_errors=True)
                collect.PREFETCH = 0 if name.endswith("PREFETCH 0") else default
                rows[name].append(
                    tokens_per_second(cache if name == "cache" else report, args.tokens)
                )
        collect.PREFETCH = default
        print(f"{args.tokens:,} tokens, {args.threads} torch thread(s), {args.reps} reps")
        print("| command | tokens/s per rep | median |\n|---|---|---:|")
        for name, values in rows.items():
            each = ", ".join(f"{v:,.0f}" for v in values)
            print(f"| {name} | {each} | {sorted(values)[len(values) // 2]:,.0f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main_()
