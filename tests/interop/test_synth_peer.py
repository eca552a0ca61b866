"""``saekit bench synth --peer saelens``: SAELens's own trainer (the interop venv) beside
saekit's, on one world and the same samples. Tiny protocol (2 SAEs, 4 steps, 4096 held-out
tokens) so it runs in well under a minute on the 2-core machine."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from harness import require_other_python

from saekit.data.sources.synthbench import SynthBenchSource
from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig
from saekit.synthbench.bench import scaled_protocol

pytestmark = pytest.mark.interop
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.float().contiguous().numpy().tobytes()).hexdigest()


def test_peer_saelens_trains_on_saekits_samples_and_both_rows_print(tmp_path, capsys):
    python = require_other_python()
    # a small world SAELens builds from saekit's settings (as --peer does without --world)
    world = tmp_path / "world"
    job = tmp_path / "world.json"
    settings = replace(scaled_protocol().world, n_features=256, d=32, n_roots=4, depth=2,
                       correlation_rank=4, ortho_steps=10)  # fmt: skip
    job.write_text(json.dumps({"world_config": asdict(settings), "world": str(world)}))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run([str(python), str(BENCHMARKS / "saelens_peer.py"), "world", str(job)],
                   check=True, env=env)  # fmt: skip
    spec = importlib.util.spec_from_file_location("bench_synth", BENCHMARKS / "bench_synth.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--peer", "saelens", "--peer-python", str(python), "--world", str(world),
            "--arch", "BatchTopK", "--arch", "Standard L1", "--samples", "4096", "--l0", "25",
            "--eval-tokens", "4096", "--json", str(tmp_path / "out.json")]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert script.main(argv) == 0
        out = capsys.readouterr()
        # the samples: saekit's own first training and held-out batch, from its own sampler, at
        # the bench's 1 thread (x = acts · directions is summed in another order on 2 threads)
        loaded = load_saelens_world(SynthBenchConfig(world_path=str(world), sampler="saelens"))
        data = SynthBenchData(loaded.cfg, stream_seed=0, world=loaded)
        first = sha(data.batch(0, 1024).x)
        held = sha(data.batch(SynthBenchSource.EVAL_INDEX, 4096).x)
    finally:
        torch.set_num_threads(threads)
    assert f"same first training and held-out batch (SHA-256 {first[:12]}, {held[:12]})" in out.err
    assert data.batch(0, 1024).x.shape == (1024, loaded.cfg.d)
    rows = [line for line in out.out.splitlines() if line.startswith("| BatchTopK")]
    assert [r.split("|")[2].strip() for r in rows] == ["saekit", "SAELens"]
    raw = json.loads((tmp_path / "out.json").read_text())
    ours, theirs = raw["seeds"][0]["BatchTopK|25"], raw["peer"][0]["BatchTopK|25"]
    assert ours["l0"] == pytest.approx(11, rel=0.05) and theirs["l0"] > 0
    assert loaded.cfg.n_features == 256  # the world given, not the protocol's
    assert set(raw["peer"][0]) == set(raw["seeds"][0]) == {"BatchTopK|25", "Standard L1|25"}
