"""``saekit report --models`` of a crosscoder over the same hook of two models (model diffing):
both models run on the same tokens, and the report's metrics are those of a plain pass over what
each model gives alone. Fixtures: tests/data/test_model_set.py, tests/eval/test_model_diff_eval.py.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_model_diff_eval import HOOKS, diff  # noqa: F401  (fixture)
from test_model_set import L1, pair  # noqa: F401  (fixture)
from transformers import AutoTokenizer, LlamaForCausalLM

from saekit.cli import main
from saekit.data.documents.reading import documents
from saekit.data.lm.harvester import Harvester, TokenFilter, unpack_batch
from saekit.data.lm.text import token_batches
from saekit.model.dictionary import load_dictionary

CONTEXT, BATCH, N_BATCHES = 16, 4, 2


def test_a_crosscoder_report_runs_both_models_on_the_same_tokens(pair, diff, capsys):  # noqa: F811
    base, ft, _, docs = pair
    site = diff / "site"
    argv = ["report", str(diff / "cc"), "--models", f"base={base}", f"ft={ft}"]
    argv += ["--local-files-only", "--text-file", str(docs), "--context-length", str(CONTEXT)]
    argv += ["--batch-size", str(BATCH), "--max-tokens", str(CONTEXT * BATCH * N_BATCHES)]
    assert main([*argv, "--latents", "4", "--no-progress", "--out", str(site)]) == 0
    data = json.loads((site / "report.json").read_text())
    summary = data["summary"]
    assert summary["model"] == f"base={base}, ft={ft}" and summary["hook"] == ", ".join(HOOKS)
    assert [e["decoder_norms"]["norms"][1][0] for e in data["latents"]] == [HOOKS[1]] * 4
    # the pooled FVU of a plain pass over each model's own activations (every kept token)
    tokenizer = AutoTokenizer.from_pretrained(base)
    contexts = list(itertools.islice(token_batches(
        documents(text_file=str(docs)), tokenizer, context_length=CONTEXT, batch_size=BATCH
    ), N_BATCHES))  # fmt: skip
    parts = []
    for path in (base, ft):
        harvester = Harvester(LlamaForCausalLM.from_pretrained(path), [L1],
                              token_filter=TokenFilter.from_tokenizer(tokenizer))  # fmt: skip
        parts.append(torch.cat([harvester(*unpack_batch(b))[L1] for b in contexts]))
    x = torch.cat(parts, dim=-1)
    with torch.no_grad():
        x_hat = load_dictionary(diff / "cc")(x).x_hat.double()
    x = x.double()
    fvu = float((x - x_hat).pow(2).sum() / sum(
        (x[:, s * 64 : (s + 1) * 64] - x[:, s * 64 : (s + 1) * 64].mean(0)).pow(2).sum()
        for s in range(2)
    ))  # fmt: skip
    assert summary["n_tokens"] == len(x)
    assert summary["fvu"] == pytest.approx(fvu, rel=1e-5)
