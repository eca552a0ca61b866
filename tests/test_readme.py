"""The README's examples run as written (shortened: fewer steps and tokens)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_model_set import pair  # noqa: F401  (fixture: two tiny Llamas)

from saekit.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.slow  # five SAEs of 4096 latents, ~10 s; CI runs it (make test-slow)
def test_the_run_yaml_example_trains(tmp_path, capsys):
    (block,) = [b for b in _blocks("yaml") if b.startswith("# run.yaml")]
    config = tmp_path / "run.yaml"
    config.write_text(block)
    short = ["--steps", "3", "--batch-size", "256", "--set", "eval_tokens=512", "--no-progress"]
    # the README's own command line on it (--steps 5000 shortened to 3)
    args = ["--set", "saes.0.sae.activation.k=16", "--out", str(tmp_path / "r2"), *short]
    assert main(["train", "--config", str(config), *args]) == 0


def test_the_python_example_runs(tmp_path, monkeypatch):
    (block,) = [b for b in _blocks("python") if "SAE.load" in b]
    monkeypatch.chdir(tmp_path)
    sample_activations = torch.randn(512, 768)
    exec(block, {"sample_activations": sample_activations, "x": torch.randn(4, 768)})
    assert (tmp_path / "my_sae" / "cfg.json").is_file()


def test_the_model_diffing_commands_and_config_train_a_crosscoder(pair, tmp_path, one_thread):  # noqa: F811
    """The README's model-diffing commands and config file as written, on two tiny Llamas (one a
    perturbed copy: tests/data/test_model_set.py) and a local text file instead of Gemma 2 and
    the hub dataset; block 1 for block 13 (the tiny ones have 3), 3 steps of 64 tokens."""
    from saekit.model.dictionary import load_dictionary

    base, ft, _, docs = pair
    (block,) = [b for b in _blocks("sh") if b.startswith("# model diffing")]
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()[1:]]
    assert [c[1] for c in commands] == ["train", "cache", "train", "eval", "report"]

    def local(arg: str) -> str:
        for hub, path in (("google/gemma-2-2b-it", ft), ("google/gemma-2-2b", base)):
            arg = arg.replace(hub, str(path))
        arg = arg.replace("batchtopk-k100-M16384", "batchtopk-k4-M32")  # the shortened one's
        return arg.replace("model.layers.13", "model.layers.1")

    sizes = {"--batch-size": "64", "--steps": "3", "--max-tokens": "1100"}
    small = ["--set", "saes.0.sae.d_sae=32", "--set", "saes.0.sae.activation.k=4"]
    small += ["--set", "eval_tokens=128", "--set", "data.shuffle_buffer_tokens=256"]
    online = ["--set", "data.context_length=16", "--set", "data.model_batch_size=8"]
    online += ["--local-files-only"]
    extra = {"train": small, "cache": ["--context-length", "16"]}
    extra["cache"] += ["--batch-size", "8", "--shard-tokens", "256", "--local-files-only"]
    extra["eval"] = ["--context-length", "16", "--n-batches", "2", "--local-files-only"]
    extra["report"] = [*extra["eval"][:2], "--max-tokens", "256", "--latents", "2"]
    extra["report"].append("--local-files-only")
    outs = []
    for command in commands:
        argv, args = [], iter(command[1:])
        for arg in args:
            if arg == "--dataset":
                argv += ["--text-file", str(docs)]
                next(args)
            elif arg in sizes and not (command[1] == "cache" and arg == "--batch-size"):
                argv += [arg, sizes[arg]]
                next(args)
            elif arg.startswith(("runs/", "caches/")):  # the directories written and read
                argv.append(str(tmp_path / local(arg)))
            else:
                argv.append(local(arg))
        argv += extra[command[1]]
        argv += online if "--models" in command and command[1] == "train" else []
        assert main(argv + ["--no-progress"] * (command[1] != "eval")) == 0, argv
        if "--out" in command:
            outs.append(tmp_path / command[command.index("--out") + 1])
    (config,) = [b for b in _blocks("yaml") if b.startswith("# model-diff.yaml")]
    run = yaml.safe_load(config)
    run["data"] = yaml.safe_load(local(yaml.safe_dump(run["data"])))
    del run["data"]["dataset"]
    run["data"].update(text_file=str(docs), local_files_only=True, context_length=16,
                       model_batch_size=8, shuffle_buffer_tokens=256)  # fmt: skip
    run["saes"][0]["sae"].update(d_sae=32, activation={"kind": "batchtopk", "k": 4})
    run.update(steps=3, batch_size=64, eval_tokens=128, out_dir=str(tmp_path / "from-yaml"))
    (tmp_path / "model-diff.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    assert main(["train", "--config", str(tmp_path / "model-diff.yaml"), "--no-progress"]) == 0
    hooks = ["base/model.layers.1", "chat/model.layers.1"]
    for run_dir in (outs[0], outs[2], tmp_path / "from-yaml"):
        (saved,) = [p.parent for p in run_dir.glob("*/cfg.json")]
        model = load_dictionary(saved)
        assert model.cfg.kind == "crosscoder" and model.cfg.hooks == hooks, run_dir
    assert (outs[0] / "batchtopk-k4-M32" / "report" / "index.html").is_file()  # saekit report
    assert (outs[1] / "manifest.json").is_file()


def test_the_help_answers_without_torch_in_well_under_a_second():
    code = "import sys, saekit.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "saekit", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert time.perf_counter() - start < 1.0
    listed = re.search(r"\{([a-z,]+)\}", out).group(1).split(",")
    assert sorted(listed) == sorted(
        [
            "train",
            "sweep",
            "bench",
            "cache",
            "eval",
            "hooks",
            "convert",
            "finetune",
            "report",
            "pipeline",
            "export",
            "import",
        ]
    )


def test_the_benchmark_configs_train(tmp_path):
    """Every run config kept in benchmarks/ still loads and trains (3 short steps), and each SAE
    it names is saved."""
    configs = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.yaml"))
    assert configs
    for config in configs:
        out = tmp_path / config.stem
        short = ["--steps", "3", "--batch-size", "256", "--set", "eval_tokens=512"]
        assert main(["train", "--config", str(config), "--out", str(out), *short,
                     "--no-progress"]) == 0  # fmt: skip
        names = re.findall(r'name: "([^"]+)"', config.read_text())
        assert names and all((out / name / "cfg.json").is_file() for name in names)


def _commands(block: str) -> list[list[str]]:
    """The shell commands of a README block (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def test_the_clt_and_crosscoder_commands_train_on_a_tiny_llama(tmp_path, tiny_tokenizer):
    """The README's two model commands, as written, on a 7-layer tiny Llama and a local text
    file instead of SmolLM2 and the hub dataset, shortened to 3 steps of 64 tokens."""
    from conftest import make_tiny_llama

    from saekit.model.dictionary import load_dictionary

    (block,) = [b for b in _blocks("sh") if "saes.0.sae.kind=clt" in b]
    commands = _commands(block)
    assert [c[:2] for c in commands] == [["saekit", "train"]] * 2
    model = tmp_path / "tiny-llama"
    make_tiny_llama(seed=3, n_layer=7).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 50}" for j in range(40))
                                for i in range(60)))  # fmt: skip
    local = {"--model": str(model), "--dataset": None, "--batch-size": "64", "--steps": "3"}
    short = ["--text-file", str(docs), "--local-files-only", "--no-progress"]
    for key, value in {"data.context_length": 16, "data.model_batch_size": 8,
                       "data.shuffle_buffer_tokens": 256, "eval_tokens": 128,
                       "saes.0.sae.d_sae": 16, "saes.0.sae.activation.k": 2}.items():  # fmt: skip
        short += ["--set", f"{key}={value}"]
    for command, kind in zip(commands, ("clt", "crosscoder"), strict=True):
        argv, args = [], iter(command[1:])
        for arg in args:
            if arg in local:
                next(args)
                if local[arg] is not None:
                    argv += [arg, local[arg]]
            elif arg == "--out":
                argv += [arg, str(tmp_path / next(args))]
            else:
                argv.append(arg)
        assert main([*argv, *short]) == 0, command
        out = tmp_path / command[command.index("--out") + 1]
        (saved,) = [p.parent for p in out.glob("*/cfg.json")]
        model = load_dictionary(saved)
        inputs = [a for a in command if a.startswith("data.input_hooks=")][0]
        assert model.cfg.kind == kind and model.cfg.hooks == yaml.safe_load(inputs.split("=")[1])
        if kind == "clt":  # as the README says, circuit-tracer's format takes it
            exported = tmp_path / "exported-clt"
            assert (
                main(["export", str(saved), "--to", "circuit-tracer", "--out", str(exported)]) == 0
            )
            assert (exported / "config.yaml").is_file()


def test_the_clt_and_crosscoder_config_files_are_the_benchmark_configs():
    """The README shows benchmarks/clt.yaml and benchmarks/crosscoder.yaml as they are (each
    trains in test_the_benchmark_configs_train)."""
    shown = {b.split(":")[0][2:]: b for b in _blocks("yaml") if b.startswith("# benchmarks/")}
    assert sorted(shown) == ["benchmarks/clt.yaml", "benchmarks/crosscoder.yaml"]
    root = Path(__file__).resolve().parents[1]
    for name, block in shown.items():
        assert block == (root / name).read_text(), name


@pytest.mark.slow  # a real torchrun launch of 2 processes, ~30 s; CI runs it (make test-slow)
def test_the_wide_sae_command_trains_on_two_cpu_processes(tmp_path):
    """The README's CPU command for an SAE split over processes, shortened (2 steps)."""
    import shlex

    (line,) = [ln for b in _blocks("sh") for ln in b.splitlines() if "parallel={latent: 2}" in ln]
    args = shlex.split(line.split("saekit", 1)[1])  # as the shell splits it
    assert args[:3] == ["train", "--nproc", "2"]
    out = tmp_path / "wide"
    args[args.index("--out") + 1] = str(out)
    cmd = [sys.executable, "-m", "saekit", *args, "--steps", "2", "--no-progress"]
    done = subprocess.run(cmd + ["--set", "eval_tokens=256"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoint" / "latent-1-of-2.safetensors").is_file()
    assert (out / "topk-k6-M4096" / "cfg.json").is_file()
