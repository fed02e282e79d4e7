"""The memory bound that refuses a window before a model loads, against what the optimizer then holds, on real
shapes (bert-mini: 11.2M parameters, its word embedding stored row-sparse): measured ≤ bound ≤ 1.5 × measured."""
import json

import pytest
import torch

from conftest import BERT_MINI_CONFIG, SHARED
from mfac_optim import MFAC, memory_bound_bytes

BATCH, TOKENS, NUM_GRADS = 8, 32, 8


@pytest.fixture(scope="module")
def bert_mini():
    from transformers import BertConfig, BertForSequenceClassification

    shared_config = SHARED / "models" / "bert-mini-config" / "bert_config.json"
    config = json.loads(shared_config.read_text()) if shared_config.exists() else BERT_MINI_CONFIG
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**config, num_labels=2))


@pytest.mark.parametrize("settings", [{"grad_dtype": "float32"}, {"grad_dtype": "bfloat16", "momentum": 0.9},
                                      {"grad_dtype": "bfloat16", "density": 0.01}])
def test_bound_covers_what_the_optimizer_holds_on_bert_mini(bert_mini, settings):
    params = [p for p in bert_mini.parameters()]
    optimizer = MFAC(params, num_grads=NUM_GRADS, **settings)
    generator = torch.Generator().manual_seed(1)
    for _ in range(NUM_GRADS + 2):  # wraps the window
        optimizer.zero_grad()
        tokens = torch.randint(0, bert_mini.config.vocab_size, (BATCH, TOKENS), generator=generator)
        bert_mini(input_ids=tokens, labels=torch.randint(0, 2, (BATCH,), generator=generator)).loss.backward()
        optimizer.step()
    word_embedding = next(i for i, p in enumerate(params) if p is bert_mini.bert.embeddings.word_embeddings.weight)
    if settings.get("density", 1.0) == 1.0:
        assert "row_indices" in optimizer.state[params[word_embedding]], "the word embedding is stored row-sparse"
    bound = memory_bound_bytes([p.shape for p in params], {word_embedding: BATCH * TOKENS}, NUM_GRADS,
                               settings["grad_dtype"], momentum="momentum" in settings,
                               density=settings.get("density", 1.0))
    measured = optimizer.memory_bytes(with_buffers=True)
    assert measured <= bound <= 1.5 * measured, (measured, bound, bound / measured)
