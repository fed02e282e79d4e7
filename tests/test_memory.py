"""The memory bound that refuses a window before a model loads, against what the optimizer then holds, on real
shapes (bert-mini: 11.2M parameters, its word embedding stored row-sparse): measured ≤ bound ≤ 1.5 × measured; and
run_glue.py's preflight on SST-2's batches (bert-mini and MiniLM-L6 shapes, dense and compressed): within 1.3×."""
import io
import json
import mmap
from pathlib import Path

import pytest
import torch

from conftest import BERT_MINI_CONFIG, SHARED
from mfac_optim import MFAC, huge_pages, memory_bound_bytes
from mfac_optim.huge_pages import transparent_huge_pages

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


ROWS, COLUMNS, CORNER_GRADS = 200, 64, 16
MOST_ROWS = 140  # the bound's rows per gradient: 0.7 of the matrix, past the row-sparse rule's half


def embedding_steps(optimizer: MFAC, weights: list[torch.Tensor], rows_per_step: list[int]) -> list[int]:
    """Steps whose embedding gradient touches the given number of rows (the other weight's is dense); returns
    the bytes held after each step and, at a step that moved the embedding to dense storage, the move's peak
    (everything held before it, plus the new dense window allocated beside the old one)."""
    generator = torch.Generator().manual_seed(0)
    held = []
    for rows in rows_per_step:
        weights[0].grad = torch.zeros(ROWS, COLUMNS)
        weights[0].grad[torch.randperm(ROWS, generator=generator)[:rows]] = torch.randn(rows, COLUMNS, generator=generator)
        weights[1].grad = torch.randn(weights[1].shape, generator=generator)
        before, was_sparse = optimizer.memory_bytes(with_buffers=True), "row_indices" in optimizer.state[weights[0]]
        optimizer.step()
        if was_sparse and "row_indices" not in optimizer.state[weights[0]]:
            window = optimizer.state[weights[0]]["window"]
            held.append(before + window.numel() * window.element_size())
        held.append(optimizer.memory_bytes(with_buffers=True))
    return held


@pytest.mark.parametrize("first_rows,moves", [(ROWS // 2, False), (ROWS // 10, True)])
def test_bound_holds_where_the_rows_bound_is_past_the_row_sparse_rule(first_rows, moves):
    # The corner: max_rows at 0.7 of the rows. A first gradient on half the rows makes the embedding dense from the
    # start; one on a tenth makes it row-sparse, and a later one on 0.7 of the rows moves it to dense storage.
    weights = [torch.zeros(ROWS, COLUMNS, requires_grad=True), torch.zeros(32, 48, requires_grad=True)]
    optimizer = MFAC(weights, num_grads=CORNER_GRADS, grad_dtype="bfloat16")
    rows_per_step = [first_rows] + [MOST_ROWS // 2, MOST_ROWS] * CORNER_GRADS
    held = embedding_steps(optimizer, weights, rows_per_step)
    assert ("row_indices" not in optimizer.state[weights[0]]) and len(held) == len(rows_per_step) + moves
    bound = memory_bound_bytes([w.shape for w in weights], {0: MOST_ROWS}, CORNER_GRADS, "bfloat16")
    assert max(held) <= bound, (max(held), bound)


MINILM_L6_CONFIG = {**BERT_MINI_CONFIG, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                    "intermediate_size": 1536}
SST2_BATCH, SST2_LENGTH, SST2_STEPS = 32, 128, 6


@pytest.fixture(scope="module")
def sst2_batches(tiny_bert, glue_dir):
    """SST-2's training sentences, the uncased tokenizer both models use, and the most distinct token ids a batch of
    them can hold (all 67,349 sentences tokenized: once for every case below)."""
    from transformers import AutoTokenizer

    from mfac_glue.data import most_ids_in_a_batch, read_glue_tsv

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train = read_glue_tsv(str(glue_dir / "SST-2" / "train.tsv"), "sst2")
    return train, tokenizer, most_ids_in_a_batch(train, tokenizer, ("sentence", None), SST2_BATCH, SST2_LENGTH)


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["bert-mini", "MiniLM-L6"])
@pytest.mark.parametrize("optim_args", [{"num_grads": 64, "grad_dtype": "bfloat16"},
                                        {"num_grads": 1024, "density": 0.01, "grad_dtype": "bfloat16"}])
def test_preflight_bound_is_within_1_3_times_what_the_window_holds_on_sst2_batches(shapes, optim_args, sst2_batches,
                                                                                      tmp_path):
    # run_glue.py's preflight, from the config alone and the distinct token ids SST-2's batches can hold, against
    # the optimizer run on SST-2 batches as run_glue.py makes them (32 sentences, padded to the longest).
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from mfac_optim.hf.arguments import MFACTrainingArguments
    from mfac_optim.hf.preflight import mfac_memory_bound

    shared_config = SHARED / "models" / "bert-mini-config" / "bert_config.json"
    mini = json.loads(shared_config.read_text()) if shared_config.exists() else BERT_MINI_CONFIG
    config = BertConfig(**(mini if shapes == "bert-mini" else {**mini, **MINILM_L6_CONFIG}), num_labels=2)
    train, tokenizer, ids = sst2_batches
    arguments = MFACTrainingArguments(output_dir=str(tmp_path), optim="MFAC", optim_args=json.dumps(optim_args),
                                      per_device_train_batch_size=SST2_BATCH, report_to="none")
    bound = mfac_memory_bound(config, AutoModelForSequenceClassification, arguments, SST2_LENGTH, ids_per_batch=ids)

    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    optimizer = MFAC(model.parameters(), **optim_args)
    generator = torch.Generator().manual_seed(0)
    measured = 0
    for _ in range(SST2_STEPS):
        rows = torch.randint(0, len(train["sentence"]), (SST2_BATCH,), generator=generator).tolist()
        batch = tokenizer([train["sentence"][row] for row in rows], padding=True, truncation=True,
                          max_length=SST2_LENGTH, return_tensors="pt")
        optimizer.zero_grad()
        model(**batch, labels=torch.tensor([train["label"][row] for row in rows])).loss.backward()
        optimizer.step()
        measured = max(measured, optimizer.memory_bytes(with_buffers=True))
    assert measured <= bound <= 1.3 * measured, (measured, bound, bound / measured)


def anonymous_gib() -> float:
    """This process's resident anonymous memory (file-backed pages, such as a mapped checkpoint, left out)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_resuming_takes_the_window_once_not_twice(tmp_path):
    # The Trainer's resume reads the optimizer file memory-mapped: the optimizer's copy is the only one in memory,
    # where reading the file whole beside it would take the window twice (21 GiB for a 10.4 GiB window).
    import threading
    import time
    from types import SimpleNamespace

    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    from mfac_optim.hf.trainer import MFACTrainer

    weight = torch.nn.Parameter(torch.zeros(4_000_000))
    saved = MFAC([weight], num_grads=32, damp=1e-3)  # an fp32 window of 32 × 4M: 0.48 GiB
    weight.grad = torch.randn_like(weight)
    saved.step()
    torch.save(saved.state_dict(), tmp_path / OPTIMIZER_NAME)
    torch.save({}, tmp_path / SCHEDULER_NAME)
    window_gib = saved.memory_bytes() / 2**30
    del saved
    resumed = MFAC([weight], num_grads=32, damp=1e-3)
    trainer = SimpleNamespace(args=SimpleNamespace(optim="mfac", mfac=SimpleNamespace(shard=False)),
                              optimizer=resumed, lr_scheduler=SimpleNamespace(load_state_dict=lambda state: None))
    peak, sampling = [0.0], [True]

    def sample():
        while sampling[0]:
            peak[0] = max(peak[0], anonymous_gib())
            time.sleep(0.002)

    base = anonymous_gib()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        MFACTrainer._load_optimizer_and_scheduler(trainer, str(tmp_path))
        time.sleep(0.05)
    finally:
        sampling[0] = False
        sampler.join()
    assert resumed.memory_bytes() / 2**30 == pytest.approx(window_gib)  # all of the state came back
    assert peak[0] - base < 1.3 * window_gib, (peak[0] - base, window_gib)


# --- huge pages --------------------------------------------------------------------------------------------------
MADV_NOHUGEPAGE = 15  # <linux/mman.h>


def huge_page_bytes_under(tensor: torch.Tensor) -> int:
    """The bytes on huge pages in this process's mappings that overlap `tensor`'s memory (/proc/self/smaps; asking
    for huge pages splits a mapping where the request starts and ends)."""
    first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start < last and first < end
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"), reason="no transparent huge pages")
@pytest.mark.parametrize("density, key", [(1.0, "window"), (0.5, "compressed_values")])
def test_the_window_sits_on_huge_pages(density, key):
    param = torch.nn.Parameter(torch.zeros(1 << 20))
    optimizer = MFAC([param], num_grads=8, grad_dtype="bfloat16", density=density)
    param.grad = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    window = optimizer.state[param][key]
    assert window.nbytes >= 8 << 20
    # All but the partial huge pages at its two ends (the kernel backs only whole, aligned 2 MiB pages).
    assert huge_page_bytes_under(window) >= window.nbytes - (4 << 20)


@pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"), reason="no transparent huge pages")
def test_memory_already_touched_is_moved_onto_huge_pages_and_keeps_its_values():
    # Memory touched on 4 KiB pages, as an allocator may hand it out again: fresh, kept off huge pages, then written.
    memory = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    reused = torch.frombuffer(memory, dtype=torch.float32)
    assert huge_pages.advise(reused, MADV_NOHUGEPAGE)
    reused.normal_(generator=torch.Generator().manual_seed(0))
    assert huge_page_bytes_under(reused) == 0
    expected = reused.clone()
    assert huge_pages.on_huge_pages(reused, lambda tensor: tensor) is reused
    assert torch.equal(reused, expected) and huge_page_bytes_under(reused) >= reused.nbytes - (4 << 20)


@pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"), reason="no transparent huge pages")
def test_a_loaded_window_is_copied_onto_huge_pages():
    param = torch.nn.Parameter(torch.zeros(1 << 20))
    optimizer = MFAC([param], num_grads=8, grad_dtype="bfloat16")
    param.grad = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = MFAC([param], num_grads=8, grad_dtype="bfloat16")
    resumed.load_state_dict(state)  # copies, as torch.optim does
    loaded, copied = state["state"][0]["window"], resumed.state[param]["window"]
    assert copied.data_ptr() != loaded.data_ptr() and torch.equal(copied, loaded)
    assert huge_page_bytes_under(copied) >= copied.nbytes - (4 << 20)
