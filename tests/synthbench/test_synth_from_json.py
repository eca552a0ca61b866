"""`saekit bench synth --from-json` (benchmarks/bench_synth.py): one table from the --json files
of runs made side by side. The files' protocol gives the trained k and the matched-L0 test (not
--protocol's default), files whose seeds hold other rows, a seed in two files and training flags
are refused in one line (as is --option without the Matryoshka row), and a peer of fewer seeds
says so in the header."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from saekit.synthbench.metrics import SynthScores

BENCH_SYNTH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_synth.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_synth_json", BENCH_SYNTH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(f1: float, l0: float) -> dict:
    return SynthScores(precision=f1, recall=f1, f1=f1, mcc=f1, uniqueness=1.0,
                       explained_variance=0.8, shrinkage=0.9, l0=l0, dead=0).as_dict()  # fmt: skip


def seed(f1: float, option: bool = True, l0: float = 12.0) -> dict:
    """One seed's rows at published L0 25, which the mid protocol trains at k = 12 (scaled: 11)."""
    rows = {"Matryoshka|25": scores(f1, l0)}
    if option:
        rows["Matryoshka + lista|25"] = scores(f1 + 0.1, l0)
    return rows


def write(path: Path, seeds: list[dict], ids: list[int] | None, peer=None, protocol="mid"):
    dump = {"protocol": protocol, "seeds": seeds, "wall_s": {"saekit": 1.0, "SAELens": 0.0}}
    if ids is not None:
        dump["seed_ids"] = ids
    if peer is not None:
        dump["peer"] = peer
    path.write_text(json.dumps(dump))
    return str(path)


def table(script, capsys, argv) -> str:
    assert script.main(argv) == 0
    return capsys.readouterr().out


def test_the_files_protocol_gives_the_trained_k_and_the_match(script, capsys, tmp_path):
    a = write(tmp_path / "a.json", [seed(0.6), seed(0.62)], [0, 1])
    out = table(script, capsys, ["--from-json", a])  # no --protocol: the file's, mid
    assert out.startswith("protocol mid: 2 seed(s)")
    row = next(line for line in out.splitlines() if line.startswith("| Matryoshka | saekit"))
    assert "| 25 (12) |" in row and "not matched" not in row  # L0 12 against mid's k = 12
    with pytest.raises(SystemExit, match="ran protocol 'mid', not --protocol scaled"):
        script.main(["--protocol", "scaled", "--from-json", a])


def test_files_of_other_rows_seeds_or_protocols_are_refused(script, tmp_path):
    a = write(tmp_path / "a.json", [seed(0.6), seed(0.62)], [0, 1])
    no_option = write(tmp_path / "b.json", [seed(0.61, option=False)], [2])
    for order in ([a, no_option], [no_option, a]):  # either way round: not a KeyError, not a drop
        with pytest.raises(SystemExit, match="not have the same rows .Matryoshka \\+ lista L0 25"):
            script.from_json(order)
    again = write(tmp_path / "c.json", [seed(0.61)], [1])
    with pytest.raises(SystemExit, match="seed 1 is in both"):
        script.from_json([a, again])
    scaled = write(tmp_path / "d.json", [seed(0.61)], [5], protocol="scaled")
    with pytest.raises(SystemExit, match="different protocols"):
        script.from_json([a, scaled])
    name, runs, _, walls, ids = script.from_json([a, write(tmp_path / "e.json", [seed(0.7)], [2])])
    assert (name, len(runs), walls["saekit"], ids) == ("mid", 3, 2.0, [0, 1, 2])


def test_training_flags_with_from_json_are_refused(script, tmp_path, capsys):
    a = write(tmp_path / "a.json", [seed(0.6)], [0])
    for flags in (
        ["--option", "lista"],
        ["--seeds", "3"],
        ["--first-seed", "4"],
        ["--peer", "saelens"],
    ):
        with pytest.raises(SystemExit):
            script.main(["--from-json", a, *flags])
        assert f"it trains nothing: drop {flags[0]}" in capsys.readouterr().err


def test_a_peer_of_fewer_seeds_is_counted_in_the_header_and_kept_in_a_merged_dump(
    script, capsys, tmp_path
):
    peer = [{"Matryoshka|25": scores(0.5, 12.0)}]
    a = write(tmp_path / "a.json", [seed(0.6)], [0], peer=peer)
    b = write(tmp_path / "b.json", [seed(0.62)], [1])
    merged = tmp_path / "merged.json"
    out = table(script, capsys, ["--from-json", a, "--from-json", b, "--json", str(merged)])
    assert out.startswith("protocol mid: 2 seed(s) (SAELens: 1);")
    dump = json.loads(merged.read_text())
    assert (dump["protocol"], dump["seed_ids"], len(dump["peer"])) == ("mid", [0, 1], 1)


def test_an_option_without_the_matryoshka_row_is_refused(script, capsys):
    """An option row's result is its paired difference to the Matryoshka row: without that row
    the table would print the option alone, with nothing to read it against."""
    with pytest.raises(SystemExit):
        script.main(["--arch", "BatchTopK", "--option", "lista", "--samples", "1"])
    assert "add --arch Matryoshka" in capsys.readouterr().err
