"""Activation cache: bit-exact round trip, integrity checks, resume, sharded reading."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from saekit.data.cache.reading import ActivationCache, CacheError
from saekit.data.cache.writing import write_cache
from saekit.data.lm.harvester import Harvester, TokenFilter

HOOK = "transformer.h.1"
D = 8
SIZES = [13, 40, 7, 25, 31, 4]  # 120 tokens in irregular batches


def make_batches(sizes=SIZES, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) * 4 + 1 for n in sizes]


def write(path, batches, dtype=torch.float32, shard_tokens=32, **kw):
    return write_cache(path, batches, HOOK, "tiny-gpt2", dtype, shard_tokens=shard_tokens, **kw)


def read_all(cache):
    return torch.cat([cache.load_shard(i) for i in range(len(cache.shards))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    batches = make_batches()
    manifest = write(tmp_path, batches, dtype)
    expected = torch.cat(batches).to(dtype)
    cache = ActivationCache(tmp_path)
    cache.verify()
    got = read_all(cache)
    assert got.dtype == dtype and got.shape == (120, D)
    assert torch.equal(
        got.view(torch.int16 if dtype != torch.float32 else torch.int32),
        expected.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    streamed = torch.cat(list(cache.iter_batches(batch_size=50)))
    assert torch.equal(streamed, expected)
    assert [s["n_tokens"] for s in manifest["shards"]] == [32, 32, 32, 24]
    assert manifest["total_tokens"] == 120 and manifest["d"] == D and manifest["complete"]


def test_manifest_records_hashes_and_settings(tmp_path):
    write(tmp_path, make_batches(), torch.bfloat16, metadata={"seed": 3})
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["model"], m["dtype"], m["d"]) == ("tiny-gpt2", "bfloat16", D)
    assert m["hooks"] == [{"name": HOOK, "width": D}] and m["version"] == 2
    assert m["metadata"] == {"seed": 3}
    for shard in m["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_flipped_byte_is_reported_with_the_shard_name(tmp_path):
    write(tmp_path, make_batches())
    path = tmp_path / "shard_000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a bit in the tensor payload; header and size stay valid
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard_000002\.safetensors: sha256 mismatch"):
        ActivationCache(tmp_path).verify()


def test_truncated_shard_is_reported_with_the_shard_name(tmp_path):
    write(tmp_path, make_batches())
    path = tmp_path / "shard_000001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    cache = ActivationCache(tmp_path)
    with pytest.raises(CacheError, match=r"shard_000001\.safetensors: truncated"):
        cache.verify()
    with pytest.raises(CacheError, match=r"shard_000001\.safetensors"):
        list(cache.iter_batches(16))
    (tmp_path / "shard_000003.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard_000001"):  # first bad shard is named first
        cache.verify()


class Interrupted(Exception):
    pass


def interrupted_after(batches, n):
    for i, b in enumerate(batches):
        if i == n:
            raise Interrupted
        yield b


@pytest.mark.parametrize("interrupt_at", [1, 3, 5])
def test_resumed_run_equals_uninterrupted_run(tmp_path, interrupt_at):
    batches = make_batches()
    write(tmp_path / "whole", batches)
    with pytest.raises(Interrupted):
        write(tmp_path / "resumed", interrupted_after(batches, interrupt_at))
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not partial["complete"] and partial["total_tokens"] % 32 == 0
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(tmp_path / "resumed").verify()
    ActivationCache(tmp_path / "resumed").verify(require_complete=False)
    # trap: a shard file that was renamed into place just before the crash but never made it
    # into the manifest, and a stale temp file
    stray = tmp_path / "resumed" / f"shard_{len(partial['shards']):06d}.safetensors"
    stray.write_bytes(b"garbage")
    (tmp_path / "resumed" / ".manifest.json.tmp-12345").write_bytes(b"{")
    consumed = []
    write(tmp_path / "resumed", (consumed.append(len(b)) or b for b in batches))
    assert sum(consumed) == 120  # the source is re-read from the start, the prefix skipped
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    resumed = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert whole == resumed
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (
            tmp_path / "resumed" / name
        ).read_bytes()
    # running again on a complete cache does nothing
    write(tmp_path / "resumed", iter(()))


def test_resume_refuses_other_settings_or_a_shorter_source(tmp_path):
    with pytest.raises(Interrupted):
        write(tmp_path, interrupted_after(make_batches(), 4))
    with pytest.raises(CacheError, match="different settings.*dtype"):
        write(tmp_path, make_batches(), torch.float16)
    with pytest.raises(CacheError, match="source ended"):
        write(tmp_path, make_batches()[:1])


def test_max_tokens_stops_the_cache(tmp_path):
    manifest = write(tmp_path, make_batches(), max_tokens=70)
    assert manifest["total_tokens"] == 70
    assert torch.equal(read_all(ActivationCache(tmp_path)), torch.cat(make_batches())[:70])


@pytest.mark.parametrize("bad,word", [(float("nan"), "1 NaN"), (float("inf"), "1 inf")])
def test_non_finite_activations_are_refused(tmp_path, bad, word):
    batches = make_batches()
    batches[2][3, 5] = bad
    with pytest.raises(ValueError, match=f"batch 2 of hook '{HOOK}' has .*{word}"):
        write(tmp_path, batches)


def test_float16_overflow_is_refused(tmp_path):
    batches = make_batches()
    batches[1][0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="batch 1 .*overflows float16"):
        write(tmp_path, batches, torch.float16)
    write(tmp_path / "bf16", batches, torch.bfloat16)  # bfloat16 has the range


def test_manifest_and_shard_disagreeing_names_the_file(tmp_path):
    write(tmp_path, make_batches())
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["dtype"] = "float16"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"shard_000000\.safetensors: dtype F32 .* float16"):
        ActivationCache(tmp_path).load_shard(0)
    m["dtype"], m["d"], m["hooks"][0]["width"] = "float32", D + 1, D + 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"shard_000000\.safetensors: shape \[32, 8\]"):
        ActivationCache(tmp_path).verify()


def test_batches_with_a_different_width_are_refused(tmp_path):
    batches = make_batches()
    batches[3] = torch.zeros(5, D + 2)
    with pytest.raises(ValueError, match="batch 3 has d=10"):
        write(tmp_path, batches)


def test_shuffled_reading_is_a_seeded_permutation(tmp_path):
    batches = make_batches(sizes=[50] * 4)  # 200 tokens
    write(tmp_path, batches, shard_tokens=25)
    cache = ActivationCache(tmp_path)
    rows = torch.cat(batches)

    def read(seed, **kw):
        return torch.cat(list(cache.iter_batches(16, shuffle_buffer_tokens=60, seed=seed, **kw)))

    a = read(1)
    assert a.shape == rows.shape and not torch.equal(a, rows)
    assert torch.equal(a[torch.argsort(a[:, 0])], rows[torch.argsort(rows[:, 0])])
    assert torch.equal(a, read(1))
    assert not torch.equal(a, read(2)) and not torch.equal(a, read(1, epoch=1))


def test_ranks_read_disjoint_shards_in_lockstep(tmp_path):
    write(tmp_path, make_batches(sizes=[100, 70]), shard_tokens=40)  # shards 40,40,40,40,10
    cache = ActivationCache(tmp_path)
    assert [cache.rank_shards(r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    per_rank = [list(cache.iter_batches(16, 32, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [5, 5]  # min(90, 80) // 16 batches each
    seen = [torch.cat(b) for b in per_rank]
    assert all(len(s) == 80 for s in seen)
    rank0_rows = torch.cat([cache.load_shard(i) for i in (0, 2, 4)])
    rank1_rows = torch.cat([cache.load_shard(i) for i in (1, 3)])
    assert torch.isin(seen[0][:, 0], rank0_rows[:, 0]).all()
    assert torch.isin(seen[1][:, 0], rank1_rows[:, 0]).all()
    assert not torch.isin(seen[0][:, 0], rank1_rows[:, 0]).any()


def test_harvester_dicts_go_straight_into_the_cache(tmp_path, tiny_gpt2, token_ids):
    harvester = Harvester(tiny_gpt2, [HOOK, "transformer.h.0"], token_filter=TokenFilter())
    batches = [token_ids[:2], token_ids[2:]]
    write(tmp_path, harvester.stream(batches), shard_tokens=20)
    cache = ActivationCache(tmp_path)
    cache.verify()
    expected = harvester(token_ids)[HOOK]
    assert cache.d == 64 and len(cache) == 64
    assert torch.equal(read_all(cache), expected)
