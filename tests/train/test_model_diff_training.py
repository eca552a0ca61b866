"""Model diffing in runs: a crosscoder over the same hook of two models run on the same tokens
(``data.models``; Lindsey et al. 2024), trained online with ``saekit train --config`` and from a
``saekit cache --models`` cache. The two tiny Llamas (one a perturbed copy of the other) and the
cache are tests/data/test_model_set.py's.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_clt_training import logged_losses, run_dict
from test_model_set import L1, caches, pair  # noqa: F401  (fixtures)

from saekit.cli import main
from saekit.data.cache.reading import ActivationCache
from saekit.data.documents.held_out import cache_documents
from saekit.model.crosscoder import Crosscoder
from saekit.model.dictionary import load_dictionary
from saekit.model.format import CheckpointError
from saekit.model.sae import SAE
from saekit.train.config import build_run_config
from saekit.train.run import run_training

HOOKS = [f"base/{L1}", f"ft/{L1}"]
CROSSCODER = {
    "name": "cc",
    "sae": {"kind": "crosscoder", "d_sae": 32, "activation": {"kind": "topk", "k": 4}},
    "lr": 0.03,
}


def check_crosscoder(directory, models, record):
    cc = load_dictionary(directory)
    assert isinstance(cc, Crosscoder) and cc.cfg.hooks == HOOKS and cc.cfg.n_sources == 2
    assert cc.cfg.model_name == ", ".join(f"{k}={v}" for k, v in models.items())
    assert cc.cfg.metadata["training_data"] == record
    assert 0 < json.loads((directory / "eval.json").read_text())["fvu"] < 1
    return cc


def test_a_crosscoder_trains_on_two_models_online_with_a_config_file(pair, tmp_path, one_thread):  # noqa: F811
    base, ft, _, docs = pair
    models = {"base": str(base), "ft": str(ft)}
    data = {"source": "hf", "models": models, "text_file": str(docs), "local_files_only": True,
            "context_length": 16, "model_batch_size": 8, "shuffle_buffer_tokens": 256,
            "input_hooks": HOOKS}  # fmt: skip
    config = tmp_path / "diff.yaml"
    config.write_text(yaml.safe_dump(run_dict(tmp_path, data, [CROSSCODER], steps=40)))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    losses = logged_losses(tmp_path / "run", "cc")
    assert losses[-1] < 0.6 * losses[0], losses
    text = {"text_file": str(docs.resolve()), "field": "text"}
    record = {"source": "hf", "text": text, "held_out_leading_tokens": 128 + 16, "models": models}
    directory = tmp_path / "run" / "cc"
    check_crosscoder(directory, models, record)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert list(saved["data"]["models"].items()) == list(models.items())
    # what takes a saved SAE says what this is, in one line
    with pytest.raises(CheckpointError, match="holds a 'crosscoder', not an SAE or transcoder: lo"):
        SAE.load(directory)


def test_a_crosscoder_trains_from_a_two_model_cache(pair, caches, tmp_path, capsys, one_thread):  # noqa: F811
    base, ft, _, _ = pair
    models = {"base": str(base), "ft": str(ft)}
    data = {"source": "cache", "cache_dir": str(caches / "two"), "shuffle_buffer_tokens": 256,
            "input_hooks": HOOKS}  # fmt: skip
    cfg = build_run_config(run_dict(tmp_path, data, [CROSSCODER], steps=40))
    assert cfg.saes[0].sae.hooks == HOOKS and cfg.saes[0].sae.d_in == 64
    run_training(cfg)
    losses = logged_losses(tmp_path / "run", "cc")
    assert losses[-1] < 0.6 * losses[0], losses
    cache = ActivationCache(caches / "two")
    text, training, _ = cache_documents(cache)
    record = {"source": "cache", "cache_dir": str((caches / "two").resolve()), "text": text,
              "documents": training, "models": models}  # fmt: skip
    directory = tmp_path / "run" / "cc"
    check_crosscoder(directory, models, record)
    # saekit export: no format takes a crosscoder, said in one line
    out = tmp_path / "exported"
    assert main(["export", str(directory), "--to", "saelens", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no format for a crosscoder" in err and len(err.strip().splitlines()) == 1
