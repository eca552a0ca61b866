"""Issue 28: tokenising whole documents before packing no longer prints transformers' "sequence
length is longer than the specified maximum" warning (every BERT run did), and packing still cuts
the long documents into contexts of the asked length."""

from __future__ import annotations

import copy
import logging

from saekit.data.lm.text import token_batches

TOO_LONG = "sequence-length-is-longer-than-the-specified-maximum"


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_long_documents_pack_into_contexts_without_the_too_long_warning(bert_tokenizer):
    tokenizer = copy.deepcopy(bert_tokenizer)  # the fixture is shared: its warning state too
    tokenizer.model_max_length = 512  # as a BERT checkpoint's tokenizer says
    docs = [" ".join(f"w{(d * 7 + i) % 50}" for i in range(700)) for d in range(3)]
    logger = logging.getLogger("transformers.tokenization_utils_base")
    recorder = Recorder()
    logger.addHandler(recorder)
    try:
        batches = list(token_batches(docs, tokenizer, context_length=64, batch_size=4))
        assert not [m for m in recorder.messages if "maximum sequence length" in m]
        assert not tokenizer.deprecation_warnings.get(TOO_LONG)
        # the same call as transformers' default prints it: the recorder would have seen it
        tokenizer(docs[:1], add_special_tokens=False)
        assert [m for m in recorder.messages if "maximum sequence length" in m]
    finally:
        logger.removeHandler(recorder)
    # [CLS] + 63 body tokens per context; 3 × (700 words + [SEP]) = 2103 body tokens: 33 whole
    # contexts, in batches of 4 (the last holds 1), each exactly 64 long
    contexts = [row for batch in batches for row in batch.tolist()]
    assert len(contexts) == 2103 // 63 and all(len(c) == 64 for c in contexts)
    assert all(c[0] == tokenizer.cls_token_id for c in contexts)
    body = [t for c in contexts for t in c[1:]]
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"]
        expected.append(tokenizer.sep_token_id)
    assert body == expected[: len(body)]
