"""Issue 28: a CLI-level fuzz. Random commands over train / resume / export / import / eval /
cache, on a workspace (a trained run, its SAELens export, an activation cache) whose files were
edited, truncated, swapped or deleted, run in process through ``saekit.cli.main`` with a fixed
seed and a bounded number of cases.

Each case must end in success (exit 0) or in a non-zero exit with exactly one ``saekit: error:``
line and no traceback, and after a failure every file that existed before is byte-identical.
The outcome classes are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from saekit.cli import main
from saekit.data.cache.writing import write_cache

N_CASES = int(os.environ.get("SAEKIT_FUZZ_CASES", 48))
SEED = 28
TINY = [
    "--steps", "4", "--batch-size", "128", "--no-progress", "--set", "saes.0.sae.d_sae=32",
    "--set", "data.synthetic.d=16", "--set", "data.synthetic.n_features=48",
    "--set", "eval_tokens=256", "--set", "checkpoint_every=2",
]  # fmt: skip
SAE_NAME = "topk-k6-M32"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "ws"
    assert main(["train", "--out", str(root / "run"), *TINY]) == 0
    sae = root / "run" / SAE_NAME
    assert main(["export", str(sae), "--to", "saelens", "--out", str(root / "lens")]) == 0
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(96, 16, generator=g) for _ in range(4)]
    write_cache(root / "cache", batches, "h", "m", shard_tokens=128)
    return root


def damage(root: Path, rng: random.Random) -> list[str]:
    """Edit, truncate, swap or delete one to three of the workspace's files."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    done = []
    for _ in range(rng.randint(0, 3)):
        path = rng.choice(files)
        if not path.exists():
            continue
        kind = rng.choice(["edit", "truncate", "swap", "delete", "text-edit"])
        data = path.read_bytes()
        if kind == "edit" and data:
            i = rng.randrange(len(data))
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :])
        elif kind == "truncate":
            path.write_bytes(data[: rng.randrange(len(data) + 1)])
        elif kind == "swap":
            other = rng.choice(files)
            if other.exists():
                path.write_bytes(other.read_bytes())
                other.write_bytes(data)
        elif kind == "delete":
            path.unlink()
        else:  # a plausible hand edit of a number in a text file
            text = data.decode("utf-8", errors="replace")
            digits = [i for i, c in enumerate(text) if c.isdigit()]
            if digits:
                i = rng.choice(digits)
                text = text[:i] + rng.choice("0123456789") + text[i + 1 :]
                path.write_text(text)
        done.append(f"{kind} {path.relative_to(root)}")
    return done


def command(root: Path, rng: random.Random) -> tuple[str, list[str]]:
    run, sae, lens, cache = root / "run", root / "run" / SAE_NAME, root / "lens", root / "cache"
    outs = [root / "new", run, sae, lens, cache, sae / "sae.safetensors", lens / "cfg.json"]
    out = str(rng.choice(outs))
    choices = {
        "resume": ["train", "--resume", str(run), "--no-progress"]
        + rng.choice([[], ["--steps", "6"], ["--steps", "1"], ["--force"]]),
        "train": ["train", "--out", out, *TINY]
        + rng.choice([[], ["--force"], ["--set", "saes.0.name=summary.json"]])
        + rng.choice([[], ["--cache", str(cache)]]),
        "export": ["export", str(rng.choice([run, sae, lens])), "--to"]
        + [rng.choice(["saelens", "sparsify", "circuit-tracer"]), "--out", out],
        "import": ["import", str(rng.choice([lens, sae])), "--from", "saelens", "--out", out],
        "eval": ["eval", "--sae", str(rng.choice([sae, lens])), "--cache", str(cache)]
        + rng.choice([[], ["--json", out]]),
        "cache": ["cache", "verify", str(cache)],
    }
    name = rng.choice(sorted(choices))
    return name, choices[name]


def test_cli_fuzz(workspace, tmp_path, capsys):
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()  # printed with SAEKIT_FUZZ_CASES set
    for case in range(N_CASES):
        root = tmp_path / f"case{case}"
        shutil.copytree(workspace, root)
        damaged = damage(root, rng)
        name, argv = command(root, rng)
        before = snapshot(root)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        where = f"case {case}: saekit {' '.join(argv)} after {damaged}"
        assert "Traceback" not in err, where
        if code == 0:
            outcomes[f"{name}: ok"] += 1
        else:
            errors = [x for x in err.splitlines() if x.startswith("saekit: error:")]
            assert len(errors) == 1, f"{where}: {err}"
            reasons[f"{name}: {errors[0].replace(str(root), '')[:110]}"] += 1
            changed = [k for k, v in before.items() if not (root / k).is_file()]
            changed += [
                k
                for k, v in before.items()
                if (root / k).is_file() and (root / k).read_bytes() != v
            ]
            if name == "train" and "--force" in argv:  # consented: the old run is replaced
                replaced = Path(argv[argv.index("--out") + 1]).relative_to(root)
                changed = [k for k in changed if not Path(k).is_relative_to(replaced)]
            assert not changed, f"{where}: failed ({errors[0]}) but changed {changed}"
            outcomes[f"{name}: refused"] += 1
        shutil.rmtree(root)
    with capsys.disabled():
        print(
            f"\nCLI fuzz: {N_CASES} cases: "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )
        if os.environ.get("SAEKIT_FUZZ_CASES"):
            print("\n".join(f"{v:4d} {k}" for k, v in reasons.most_common()))
    assert sum(outcomes.values()) == N_CASES
    assert any(k.endswith("ok") for k in outcomes) and any(k.endswith("refused") for k in outcomes)
