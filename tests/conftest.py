"""Shared fixtures. Everything is built offline from configs with random weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tests/ mirrors src/saekit/ (tests/<room>/test_<module>.py). Some tests reuse another's float64
# references (``from test_objective import ...``); every room's folder is on the path so they
# find them wherever they live (pytest's default "prepend" import mode adds only the test's own
# folder and this one).
for _room in sorted(Path(__file__).resolve().parent.iterdir()):
    if _room.is_dir() and not _room.name.startswith((".", "_")):
        sys.path.insert(0, str(_room))

TINY_VOCAB = 300
TINY_BOS = 1  # also EOS, as in GPT-2
TINY_PAD = 0


# The CLI tests' tiny TopK SAE and short run (`saekit train` flags).
TINY_SAE_ARGS = [
    "--set",
    "saes.0.sae.d_sae=64",
    "--set",
    "saes.0.sae.activation.k=4",
    "--set",
    "saes.0.lr=0.001",
]
SMALL_RUN_ARGS = [
    "--steps",
    "8",
    "--batch-size",
    "128",
    "--no-progress",
    "--set",
    "eval_tokens=256",
]


def make_tiny_gpt2(seed: int = 0, n_layer: int = 3, initializer_range: float = 0.02):
    """A 3-layer GPT-2 (d=64) with random weights, in eval mode. The default init gives
    near-uniform next-token distributions; a larger ``initializer_range`` gives peaked ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=4,
        vocab_size=TINY_VOCAB,
        n_positions=64,
        bos_token_id=TINY_BOS,
        eos_token_id=TINY_BOS,
        pad_token_id=TINY_PAD,
        initializer_range=initializer_range,
    )
    return GPT2LMHeadModel(config).eval()


def save_tiny_lm(root, tokenizer, n_docs: int = 150, seed: int = 0):
    """(model dir, text file, documents): a tiny GPT-2 saved with ``tokenizer`` in root/m and
    ``n_docs`` documents of 5-39 random words w0..w49 in root/docs.txt, blank-line separated."""
    import random

    make_tiny_gpt2().save_pretrained(root / "m")
    tokenizer.save_pretrained(root / "m")
    rng = random.Random(seed)
    docs = [
        " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(5, 40)))
        for _ in range(n_docs)
    ]
    (root / "docs.txt").write_text("\n\n".join(docs))
    return root / "m", root / "docs.txt", docs


@pytest.fixture(scope="session")
def tiny_gpt2():
    """Shared tiny GPT-2; tests must not change its weights."""
    return make_tiny_gpt2()


@pytest.fixture
def token_ids():
    """[4, 16] random ids in [2, 250): tests place BOS, PAD and ids >= 250 themselves."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 250, (4, 16), generator=g)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A whitespace word-level fast tokenizer over a small vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<unk>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


SYNC_METHODS = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def host_sync_raises(monkeypatch):
    """Every way a tensor's value reaches the host raises (on a GPU each would be a sync)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the training step")

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited and been reaped (a writer killed mid-write)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_tiny_llama(seed: int = 0, n_layer: int = 2, initializer_range: float = 0.02):
    """A 2-layer Llama (d=64, grouped-query attention) with random weights, in eval mode (a larger
    ``initializer_range`` gives peaked next-token distributions, as for :func:`make_tiny_gpt2`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=64,
        bos_token_id=TINY_BOS,
        eos_token_id=TINY_BOS,
        pad_token_id=TINY_PAD,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_bert(seed: int = 0, n_layer: int = 2, head: bool = True):
    """A 2-layer BERT (d=64) with random weights: with its masked-LM head or the bare encoder."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=n_layer,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=64,
        pad_token_id=TINY_PAD,
    )
    return (BertForMaskedLM if head else BertModel)(config).eval()


@pytest.fixture(scope="session")
def bert_tokenizer():
    """A BERT-style word-level tokenizer: [CLS] and [SEP], no BOS or EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
