"""Crosscoders and cross-layer transcoders under latent parallelism, against one process
(float64): on a mesh of threads (test_latent_member.py's), on real gloo processes, and resumed
on another mesh from a sharded checkpoint.

A crosscoder's part is a crosscoder of M/T latents; a CLT's part holds M/T latents of every
layer (saekit.train.latent_parts), so its TopK selects per (token, layer) across the parts and
its BatchTopK the k·N largest across all layers and parts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_latent_member import BATCH, STEPS, assert_same, record_selections, run_mesh
from test_latent_parallel import join_all, join_env, save_rank, spawn

from saekit.model.dictionary import build_dictionary, load_dictionary
from saekit.train.config import build_run_config, make_source
from saekit.train.latent_checkpoint import gathered_state
from saekit.train.latent_parts import join_parts, normal_rows
from saekit.train.mesh import check_latent_saes
from saekit.train.trainer import Trainer

L, D_IN = 3, 8
CLT_WORLD = {"kind": "clt", "n_layers": L, "d": D_IN, "n_features": 24, "mean_l0": 3.0}
CLT_DATA = {
    "source": "multihook",
    "multihook": CLT_WORLD,
    "input_hooks": [f"layers.{layer}.mlp:input" for layer in range(L)],
    "target_hooks": [f"layers.{layer}.mlp" for layer in range(L)],
}
CC_DATA = {
    "source": "multihook",
    "multihook": {"kind": "crosscoder", "n_sources": 2, "d": D_IN, "n_features": 24},
    "input_hooks": ["a", "b"],
}
# dead after one batch without firing: the dead counters and AuxK matter from the second step
BASE = {"lr": 1e-2, "warmup_steps": 1, "decay_start": 1.0, "dead_tokens": BATCH}


def clt(activation, **extra) -> dict:
    sae = {"kind": "clt", "d_sae": 16, "activation": activation, "dtype": "float64"}
    return {"sae": sae, **BASE, **extra}


CLT_TOPK = clt({"kind": "topk", "k": 2}, revival={"kind": "auxk"}, seed=1)  # k per layer
CLT_BATCHTOPK = clt({"kind": "batchtopk", "k": 5}, seed=2)  # k·N over all layers
CLT_JUMPRELU = clt(
    {"kind": "jumprelu", "ste_to_input": True},
    penalty={"kind": "l0", "coefficient": 0.05, "target_l0": 6.0},  # the λ controller
    seed=3,
)
CLTS = [CLT_TOPK, CLT_BATCHTOPK, CLT_JUMPRELU]
CROSSCODER = {
    "sae": {"kind": "crosscoder", "d_sae": 32, "activation": {"kind": "topk", "k": 3},
            "dtype": "float64"},
    "revival": {"kind": "auxk"},
    "seed": 4,
    **BASE,
}  # fmt: skip


CC_RELU_L1 = {
    "sae": {"kind": "crosscoder", "d_sae": 32, "activation": "relu", "dtype": "float64"},
    "penalty": {"kind": "l1", "coefficient": 0.05},  # weighted by Σ_s ‖W_dec^s_i‖
    "seed": 5,
    **BASE,
}
CROSSCODERS = [CROSSCODER, CC_RELU_L1]


def config(out_dir: Path, data: dict, saes: list[dict], parallel="data", **kw):
    fields = {
        "data": copy.deepcopy(data),
        "saes": copy.deepcopy(saes),
        "batch_size": BATCH,
        "steps": STEPS,
        "log_every": 5,
        "checkpoint_every": 0,
        "eval_tokens": 128,
        "out_dir": str(out_dir),
        "progress": False,
        "parallel": parallel,
    }
    return build_run_config({**fields, **kw})


def one_process(cfg) -> dict[str, torch.Tensor]:
    trainer = Trainer(cfg, make_source(cfg))
    trainer.fit(progress=False)
    return {
        f"{m.cfg.name}.{k}": v.detach().clone()
        for m in trainer.members
        for k, v in m.state_tensors().items()
    }


def whole_states(trainers) -> dict[str, torch.Tensor]:
    """Every member's whole state: the parts of data group 0 joined along their axes, the rest
    rank 0's; every data group holds the same parts."""
    T, out = trainers[0].mesh.T, {}
    for i, member in enumerate(trainers[0].members):
        axes = member.part_state_axes()
        own = [tr.members[i].state_tensors() for tr in trainers]
        for r in range(T, len(trainers)):
            for key, value in own[r].items():
                assert torch.equal(value, own[r % T][key]), (member.cfg.name, r, key)
        for key, value in own[0].items():
            if key in axes:
                value = join_parts([own[t][key] for t in range(T)], axes[key])
            out[f"{member.cfg.name}.{key}"] = value.detach().clone()
    return out


def assemble(seen, D: int, T: int, groups: list[int]) -> list[torch.Tensor]:
    """Each call's selection [N, all latents] from the ranks' blocks (call j is SAE j % len)."""
    calls = []
    for j in range(len(seen["rank0"])):
        axis = (1, groups[j % len(groups)])
        rows = [join_parts([seen[f"rank{d * T + t}"][j] for t in range(T)], axis) for d in range(D)]
        calls.append(torch.cat(rows, 0))
    return calls


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process: the CLTs' and the crosscoder's states after 20 steps and selections."""
    out = {}
    for name, data, saes in (("clt", CLT_DATA, CLTS), ("cc", CC_DATA, CROSSCODERS)):
        with pytest.MonkeyPatch.context() as monkeypatch:
            seen = record_selections(monkeypatch)
            states = one_process(config(tmp_path_factory.mktemp(name), data, saes))
        out[name] = (states, seen["MainThread"])
    return out


CASES = {"clt": (CLT_DATA, CLTS, [L] * len(CLTS)), "cc": (CC_DATA, CROSSCODERS, [1, 1])}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("D", "T"), [(1, 2), (2, 2)])
def test_a_sharded_clt_and_crosscoder_select_and_train_as_one_process(
    tmp_path, references, name, D, T
):
    """CLT: TopK per layer + AuxK, BatchTopK across the layers, JumpReLU + the L0 controller;
    crosscoders with TopK + AuxK and ReLU + L1 (Σ_s ‖W_dec^s_i‖ weights): the same latents at
    each of 20 steps, the same weights, Adam moments and dead counters after them."""
    data, saes, groups = CASES[name]
    expected, reference = references[name]
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_selections(monkeypatch)
        trainers = run_mesh(config(tmp_path, data, saes, {"data": D, "latent": T}), D, T)
    got = assemble(seen, D, T, groups)
    assert len(got) == len(reference) == STEPS * len(saes)
    for j, (a, b) in enumerate(zip(reference, got, strict=True)):
        assert torch.equal(a, b), f"step {j // len(saes)}, SAE {j % len(saes)}"
    assert_same(expected, whole_states(trainers))
    dead = expected[f"{trainers[0].members[0].cfg.name}.tokens_since_fired"]
    assert (dead >= BATCH).any() and (dead == 0).any()  # AuxK had dead latents to revive


@pytest.mark.parametrize(("name", "width"), [("clt", L * D_IN), ("cc", 2 * D_IN)])
def test_the_partial_sums_are_one_all_reduce_of_the_concatenated_prediction(tmp_path, name, width):
    """Per step of a TopK CLT (crosscoder) without dead latents: one all-gather of the
    [N·L, k] per-layer candidates ([N, k]) and ONE all-reduce, of [N, L·d_out] ([N, S·d])."""
    data, saes, groups = CASES[name]
    sae = {**saes[0], "dead_tokens": 10**9}
    cfg = config(tmp_path, data, [sae], {"latent": 2})
    cfg.steps = 3
    calls = run_mesh(cfg, 1, 2)[0].mesh.latent.group.calls
    k = sae["sae"]["activation"]["k"]
    gather = ("all_gather", "", "TopK candidates", BATCH * groups[0] * k)
    big = [c for c in calls if c[3] >= BATCH]
    assert big == [gather, ("all_reduce", "sum", "decoder partial sums", BATCH * width)] * 3


def test_a_sharded_clt_part_draws_its_rows_of_one_process_initialisation():
    """d_in ≠ d_out: W_enc is drawn after the decoders, its rows l·M + t·M/T + i of one draw."""
    from saekit.core.comm import LocalComm
    from saekit.core.shard import LatentShard
    from saekit.model.clt import CLTConfig
    from saekit.train.latent_parts import init_part_

    cfg = CLTConfig(d_in=5, d_out=3, d_sae=8, n_layers=3, activation={"kind": "topk", "k": 1})
    whole = build_dictionary(cfg)
    whole.reset_parameters(torch.Generator().manual_seed(7))
    comm = LocalComm()
    for t in range(4):
        part = build_dictionary(CLTConfig(**{**cfg.__dict__, "d_sae": 2}))
        init_part_(part, 7, LatentShard(comm, comm, comm, t, 4, 8))
        assert torch.equal(part.W_enc, whole.W_enc[:, 2 * t : 2 * t + 2])
        for a, b in zip(part.W_dec, whole.W_dec, strict=True):
            assert torch.equal(a, b[2 * t : 2 * t + 2])
    g = torch.Generator().manual_seed(1)
    drawn = torch.randn(12, 5, generator=g)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(
        normal_rows(g, 12, 5, 1, 2, groups=3), drawn.view(3, 4, 5)[:, 1:3].reshape(6, 5)
    )


STOP = 10


def stop_at(step: int):
    def fit(trainer):
        trainer.cfg.steps = step
        trainer.fit(progress=False)

    return fit


def resume(trainer):
    trainer.load_checkpoint()
    assert trainer.step == STOP
    trainer.fit(progress=False)


@pytest.mark.parametrize(("first", "then"), [((1, 2), (2, 1)), ((2, 2), (1, 1))])
def test_a_sharded_clt_resumes_on_another_mesh_where_it_would_have_been(
    tmp_path, references, first, then
):
    """Stopped at step 10 on one (D, T), resumed on another: the states of one process that
    never stopped; the sharded checkpoint is the whole CLT (gathered_state)."""
    run_dir = tmp_path / "run"
    parallel = {"data": first[0], "latent": first[1]}
    trainers = run_mesh(config(run_dir, CLT_DATA, CLTS, parallel), *first, stop_at(STOP))
    member = trainers[0].members[0]
    gathered = build_dictionary(member.cfg.sae)
    gathered.load_state_dict(gathered_state(run_dir, 0))  # every tensor, whole
    parts = [tr.members[0].sae.W_enc for tr in trainers[: first[1]]]
    assert torch.equal(gathered.W_enc, torch.cat(parts, 1).detach())
    cfg = config(run_dir, CLT_DATA, CLTS, {"data": then[0], "latent": then[1]})
    assert_same(references["clt"][0], whole_states(run_mesh(cfg, *then, resume)))


def test_what_a_sharded_clt_cannot_do_is_refused_in_one_line(tmp_path):
    for sae, message in (
        (clt({"kind": "abstopk", "k": 2}), "'abstopk' has no latent-sharded form"),
        (clt({"kind": "topk", "k": 2}, revival={"kind": "preact"}), "'preact' has no latent"),
        ({**CLT_TOPK, "sae": {**CLT_TOPK["sae"], "d_sae": 15}}, "d_sae = 15 is not divisible"),
        (clt({"kind": "topk", "k": 9}), "k = 9 exceeds d_sae = 8 per process"),
    ):
        cfg = config(tmp_path, CLT_DATA, [sae])
        with pytest.raises(ValueError, match=message) as info:
            check_latent_saes(cfg.saes, 2)
        assert "\n" not in str(info.value) and str(info.value).startswith("saes.0: ")
    from saekit.train.member_config import SAETrainConfig

    abstopk = SAETrainConfig(
        sae={"d_in": 8, "d_sae": 16, "activation": {"kind": "abstopk", "k": 2}}
    )
    with pytest.raises(ValueError, match="saes.0: sae.activation.kind 'abstopk' has no latent"):
        check_latent_saes([abstopk], 2)  # an SAE's too: TopK's sharded selection is not its own
    lista = SAETrainConfig(
        sae={"d_in": 8, "d_sae": 16, "activation": {"kind": "topk", "k": 2}, "encoder_steps": 2}
    )
    with pytest.raises(ValueError, match="saes.0: sae.encoder_steps > 1 has no latent-sharded"):
        check_latent_saes([lista], 2)  # LISTA steps (saekit.model.lista): one process only


# ---------------------------------------------------------------------- gloo


GLOO = CLTS[:1]  # TopK per layer + AuxK: the run stays under 10 s; the rest on threads above


def _clt_worker(rank: int, port: int, world: int, out_dir: str) -> None:
    from saekit.train.launch import init_from_env
    from saekit.train.run_distributed import run_distributed

    join_env(rank, port, world, timeout_s=60)
    init_from_env("cpu")
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_selections(monkeypatch)
        run_dir = Path(out_dir)
        trainer, reports = run_distributed(config(run_dir, CLT_DATA, GLOO, {"latent": 2}))
    assert (len(reports) == len(GLOO)) == (rank == 0)
    save_rank(trainer, run_dir / f"rank{rank}.safetensors", next(iter(seen.values())))
    axes = {m.cfg.name: m.part_state_axes() for m in trainer.members}
    (run_dir / "part_axes.json").write_text(json.dumps(axes))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_a_sharded_clt_as_one_process(tmp_path, references):
    """T = 2 on gloo, a TopK CLT with AuxK: every selection and state as one process, and rank
    0's gathered directory loads (load_dictionary) as one process's CLT, folded."""
    out = tmp_path / "mesh"
    assert join_all(spawn(_clt_worker, 2, str(out)), 120) == [0, 0]
    expected, reference = references["clt"]
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    axes = json.loads((out / "part_axes.json").read_text())
    states = {}
    for key, value in ranks[0].items():
        if key.startswith("selected."):
            continue
        name, rest = key.split(".", 1)
        axis = axes[name].get(rest)
        states[key] = value if axis is None else join_parts([r[key] for r in ranks], tuple(axis))
    assert_same({k: v for k, v in expected.items() if k.split(".", 1)[0] in axes}, states)
    for j, a in enumerate(reference[:: len(CLTS)]):  # the one-process run's first CLT
        got = join_parts([r[f"selected.{j}"] for r in ranks], (1, L)).bool()
        assert torch.equal(a, got), f"step {j}"
    assert f"selected.{STEPS - 1}" in ranks[0]
    for s in config(out, CLT_DATA, GLOO).saes:
        whole = build_dictionary(s.sae)
        prefix = f"{s.name}.sae."
        whole.load_state_dict({k[len(prefix) :]: v for k, v in expected.items() if
                               k.startswith(prefix)})  # fmt: skip
        saved = load_dictionary(out / s.name)
        assert type(saved) is type(whole)
        folded = whole.folded_copy()
        for key, value in folded.state_dict().items():
            if key != "activation.threshold" or s.sae.activation.kind != "batchtopk":
                torch.testing.assert_close(saved.state_dict()[key], value, msg=key)
        assert (out / s.name / "eval.json").is_file()
