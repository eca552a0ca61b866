"""SAELens's own trainer on a SynthSAEBench world: the peer of ``saekit bench synth --peer
saelens``. Runs in the interop venv (real sae-lens); nothing here imports saekit.

``python saelens_peer.py world JOB.json``: builds the world of JOB["world_config"] with SAELens's
``SyntheticModel`` and saves it (``SyntheticModel.save``) to JOB["world"], so both trainers read
one world.

``python saelens_peer.py train JOB.json``: trains each of JOB["archs"] with SAELens's
``SAETrainer`` on the world at JOB["world"], batch i being SAELens's own draws after
``torch.manual_seed(JOB["train_seeds"][i])`` (saekit's ``sampler: saelens`` makes the same
draws from the same seeds), then scores it with SAELens's ``eval_sae_on_synthetic_data`` on the
held-out batches of JOB["eval"] ([seed, size] each, saekit's held-out batches). Writes
JOB["out"]: per architecture its metrics and wall time, and a SHA-256 of the first training and
held-out batch (the sample-identity check).

The SAE configurations are the SynthSAEBench paper's (decoderesearch/synth-sae-bench-experiments,
experiments/sweeps/common.py); its L1 and JumpReLU SAEs move their coefficient with the
experiments' autotuner (saes/components/coefficient_autotuner.py), re-implemented here from its
description. Differences from the paper, stated: the JumpReLU's input normalisation
(``expected_average_only_in``) is off, because SAELens estimates it from 1000 extra batches of
the data provider (other samples than saekit's); its TopK aux loss is not in sae-lens 6.54
(with the 1000-step dead window no latent is dead in a run of at most 1000 steps anyway).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from sae_lens import (
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatchingPursuitTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.synthetic.evals import eval_sae_on_synthetic_data
from sae_lens.training.sae_trainer import SAETrainer


class Autotuner:
    """The experiments' coefficient autotuner: an EMA of L0 (0.99) and of its rate (0.95);
    from ``start`` on, multiplier *= 1 ± K_i·g·tanh(10·|e|/T), g = 0.01 while moving toward the
    target, clamped to [0.01, 100]."""

    def __init__(self, target: float, gain: float, start: int):
        self.target, self.gain, self.start = target, gain, start
        self.multiplier, self.smoothed, self.rate, self.steps = 1.0, 0.0, 0.0, 0

    def update(self, l0: float) -> None:
        if self.steps == 0:
            self.smoothed = l0
        else:
            previous = self.smoothed
            self.smoothed = 0.99 * self.smoothed + 0.01 * l0
            self.rate = 0.95 * self.rate + 0.05 * (self.smoothed - previous)
        self.steps += 1
        error = self.smoothed - self.target
        if self.steps - 1 < self.start or error == 0:
            return
        g = 0.01 if error * self.rate < 0 else 1.0
        a = self.gain * g * math.tanh(abs(error / self.target) * 10.0)
        m = self.multiplier * (1 + a if error > 0 else 1 - a)
        self.multiplier = min(100.0, max(0.01, m))


class _Tuned:
    """Mixin: the coefficient named ``key`` times the autotuner's multiplier, updated after
    each training forward from the batch L0 (as the experiments' X*TrainingSAE classes)."""

    key = ""
    tuner: Autotuner

    def training_forward_pass(self, step_input):
        output = super().training_forward_pass(step_input)
        self.tuner.update(float((output.feature_acts != 0).float().sum(-1).mean()))
        return output

    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):
        coefficient = step_input.coefficients[self.key] * self.tuner.multiplier
        W_dec_norm = self.W_dec.norm(dim=1)
        if self.key == "l1":  # λ · ‖z ⊙ ‖W_dec‖‖₁, mean over the batch
            per_item = (feature_acts * W_dec_norm).norm(p=1, dim=-1)
            return {"l1_loss": (coefficient * per_item).mean()}
        per_item = torch.tanh(self.cfg.jumprelu_tanh_scale * feature_acts * W_dec_norm).sum(-1)
        return {"l0_loss": (coefficient * per_item).mean()}


class TunedStandard(_Tuned, StandardTrainingSAE):
    key = "l1"


class TunedJumpReLU(_Tuned, JumpReLUTrainingSAE):
    key = "l0"


def world_config(c: dict) -> SyntheticModelConfig:
    hierarchy = None
    if c["n_roots"]:
        hierarchy = HierarchyConfig(
            total_root_nodes=c["n_roots"], branching_factor=c["branching"], max_depth=c["depth"],
            mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
            compensate_probabilities=True, scale_children_by_parent=c["scale_children"],
        )  # fmt: skip
    return SyntheticModelConfig(
        num_features=c["n_features"],
        hidden_dim=c["d"],
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=c["zipf_exponent"], max_prob=c["p_max"], min_prob=c["p_min"]
        ),
        hierarchy=hierarchy,
        orthogonalization=OrthogonalizationConfig(num_steps=c["ortho_steps"], lr=c["ortho_lr"]),
        correlation=LowRankCorrelationConfig(
            rank=c["correlation_rank"], correlation_scale=c["correlation_scale"]
        ),
        mean_firing_magnitudes=LinearMagnitudeConfig(
            start=c["magnitude_start"], end=c["magnitude_end"]
        ),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=c["std_mean"], std=c["std_std"]),
        bias=c["bias_norm"],
        seed=c["seed"],
    )


def make_sae(arch: str, job: dict, k: int):
    """The paper's configuration of ``arch`` (common.py) at this job's width and length."""
    d_in, d_sae, steps = job["d_in"], job["d_sae"], len(job["train_seeds"])
    if arch == "BatchTopK":
        cfg = BatchTopKTrainingSAEConfig(k=k, d_in=d_in, d_sae=d_sae)
    elif arch == "Matryoshka":
        widths = [w for w in job["matryoshka_widths"] if w < d_sae]
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(k=k, d_in=d_in, d_sae=d_sae,
                                                   matryoshka_widths=widths,
                                                   use_matryoshka_aux_loss=True)  # fmt: skip
    elif arch == "Matching Pursuit":
        cfg = MatchingPursuitTrainingSAEConfig(d_in=d_in, d_sae=d_sae, residual_threshold=0,
                                               max_iterations=k, decoder_init_norm=1.0,
                                               stop_on_duplicate_support=False)  # fmt: skip
    elif arch == "Standard L1":
        cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=2.0,
                                        l1_warm_up_steps=steps // 3)  # fmt: skip
        sae = TunedStandard(cfg)
        sae.tuner = Autotuner(float(k), job["tuner_gain"], steps // 3)
        return sae
    elif arch == "JumpReLU":
        cfg = JumpReLUTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=4.0,
            jumprelu_bandwidth=2.0, jumprelu_init_threshold=0.5, decoder_init_norm=0.5,
            l0_coefficient=0.2, l0_warm_up_steps=0,
        )  # fmt: skip
        sae = TunedJumpReLU(cfg)
        sae.tuner = Autotuner(float(k), job["tuner_gain"], 0)
        return sae
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return get_sae_training_class(cfg.architecture())[0](cfg)


class SeededGenerator:
    """The world's activation generator, reseeded before each held-out batch with saekit's
    seed for that batch (so eval_sae_on_synthetic_data scores saekit's held-out samples)."""

    def __init__(self, generator, seeds: list[int]):
        self.generator, self.seeds, self.i = generator, seeds, 0

    def sample(self, n: int) -> torch.Tensor:
        torch.manual_seed(self.seeds[self.i])
        self.i += 1
        return self.generator.sample(n)


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


def train(job: dict) -> dict:
    model = SyntheticModel.load_from_disk(job["world"])
    batch = job["batch_size"]
    torch.manual_seed(job["train_seeds"][0])
    first_train = model.sample(batch)
    eval_seeds = [seed for seed, _ in job["eval"]]
    torch.manual_seed(eval_seeds[0])
    first_eval = model.sample(job["eval"][0][1])
    results = {"first_train_sha256": digest(first_train),
               "first_eval_sha256": digest(first_eval), "saes": {}}  # fmt: skip
    for arch, k in job["archs"]:
        torch.manual_seed(job["init_seed"])
        sae = make_sae(arch, {**job, "d_in": model.cfg.hidden_dim}, k)

        def batches():
            for seed in job["train_seeds"]:
                torch.manual_seed(seed)
                yield model.sample(batch)

        trainer_cfg = SAETrainerConfig(
            total_training_samples=len(job["train_seeds"]) * batch,
            train_batch_size_samples=batch, lr=job["lr"], lr_end=job["lr"] / 10, device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
        )  # fmt: skip
        start = time.time()
        SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches()).fit()
        wall = time.time() - start
        n_eval = sum(n for _, n in job["eval"])
        result = eval_sae_on_synthetic_data(
            sae=sae, feature_dict=model.feature_dict,
            activations_generator=SeededGenerator(model.activation_generator, eval_seeds),
            num_samples=n_eval, batch_size=job["eval"][0][1],
        )  # fmt: skip
        c = result.classification
        results["saes"][f"{arch}|{k}"] = {
            "precision": c.precision, "recall": c.recall, "f1": c.f1_score, "mcc": result.mcc,
            "uniqueness": result.uniqueness, "explained_variance": result.explained_variance,
            "shrinkage": result.shrinkage, "l0": result.sae_l0, "dead": result.dead_latents,
            "wall_s": wall,
        }  # fmt: skip
        print(f"{arch} k={k}: {wall:.0f} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str]) -> int:
    what, path = argv
    job = json.loads(Path(path).read_text())
    torch.set_num_threads(job.get("threads", 1))
    if what == "world":
        SyntheticModel(world_config(job["world_config"])).save(job["world"])
        return 0
    Path(job["out"]).write_text(json.dumps(train(job), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
