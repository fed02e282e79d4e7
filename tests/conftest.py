"""Shared fixtures: a tiny BERT folder and GLUE-format data, real from ../shared when it is there, else generated;
and the two forms of the factor update."""
import os
import random
from pathlib import Path

import pytest
import torch

# Under pytest-xdist each worker, and each process it starts, gets its share of the cores: OpenMP teams of every
# core in every worker oversubscribe the machine, and their threads then wait on each other (here, 2 workers of 2
# threads on 2 cores took nearly 5 times the CPU time of 2 workers of 1). The threaded splits of the kernels are
# tested at several threads explicitly (`kernel_threads`).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Nothing in the suite may wait on the network; set before huggingface_hub is imported, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Without a GPU, the GPU's Triton kernels run in Triton's interpreter on CPU tensors (read when they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

def pytest_collection_modifyitems(items: list) -> None:
    """The files with the most slow tests first, each file's tests kept together (its module fixtures are made
    once per worker): pytest-xdist hands tests out in this order, so the long ones start early and the short ones
    fill the gaps, instead of one long test left running alone at the end (alphabetically, test_tune.py's came
    last)."""
    slow = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + (item.get_closest_marker("slow") is not None)
    order = {name: position for position, name in enumerate(sorted(slow, key=lambda name: -slow[name]))}
    items.sort(key=lambda item: order[item.module.__name__])


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_GLUE = SHARED / "glue"
SHARED_VOCAB = SHARED / "models" / "bert-mini-config" / "vocab.txt"

POSITIVE = ["good", "great", "fine", "nice", "happy", "love", "best", "funny"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring", "hate", "worst", "dull"]
FILLER = ["the", "movie", "film", "story", "is", "was", "a", "very", "and", "it", "plot", "actors"]


def generated_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + sorted(set(POSITIVE + NEGATIVE + FILLER + [".", ",", "not"]))


def sentence(rng: random.Random, sentiment: int) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if sentiment else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words) + " . "


def write_generated_glue(root: Path) -> Path:
    """GLUE-layout TSVs for SST-2, RTE and STS-B whose labels follow the sentiment words."""
    rng = random.Random(0)
    for split, n in (("train", 400), ("dev", 120)):
        labels = [rng.randint(0, 1) for _ in range(n)]
        (root / "SST-2").mkdir(parents=True, exist_ok=True)
        (root / "SST-2" / f"{split}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"{sentence(rng, y)}\t{y}\n" for y in labels))
        (root / "RTE").mkdir(exist_ok=True)
        (root / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
            f"{i}\t{sentence(rng, y)}\t{sentence(rng, y)}\t{['not_entailment', 'entailment'][y]}\n"
            for i, y in enumerate(labels)))
        (root / "STS-B").mkdir(exist_ok=True)
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        (root / "STS-B" / f"{split}.tsv").write_text(header + "".join(
            f"{i}\tmain\tgen\t2026\t{i:04d}\tnone\tnone\t{sentence(rng, y)}\t{sentence(rng, y)}\t{5.0 * y:.3f}\n"
            for i, y in enumerate(labels)))
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """GLUE's official TSVs from ../shared when present, else generated ones in the same layout."""
    if (SHARED_GLUE / "SST-2" / "train.tsv").exists():
        return SHARED_GLUE
    return write_generated_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer BERT saved as a model folder, with the real uncased vocab when available."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = SHARED_VOCAB.read_text().splitlines() if SHARED_VOCAB.exists() else generated_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true, "tokenizer_class": "BertTokenizer"}')
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) == len(vocab)
    return folder


# prajjwal1/bert-mini's config.json as the Hub serves it: Google's BERT config, without "model_type".
BERT_MINI_CONFIG = {"hidden_size": 256, "hidden_act": "gelu", "initializer_range": 0.02, "vocab_size": 30522,
                    "hidden_dropout_prob": 0.1, "num_attention_heads": 4, "type_vocab_size": 2,
                    "max_position_embeddings": 512, "num_hidden_layers": 4, "intermediate_size": 1024,
                    "attention_probs_dropout_prob": 0.1}


BERT_TINY_CONFIG = {**BERT_MINI_CONFIG, "hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "intermediate_size": 512}


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, glue_dir) -> Path:
    """An HF_HOME holding prajjwal1/bert-mini and bert-tiny (config.json without model_type, vocab.txt, random
    weights in pytorch_model.bin) and nyu-mll/glue sst2 prepared by `datasets`, both laid out as the Hub's clients leave them.
    The SST-2 rows are GLUE's real ones when ../shared is there (hub_cache.sst2_splits: a part of the training
    file)."""
    import io
    import json

    import datasets
    import torch
    from transformers import BertConfig, BertForPreTraining

    from hub_cache import sst2_splits, write_dataset_config, write_model_repo

    hf_home = tmp_path_factory.mktemp("hf_home")
    shared_config = SHARED / "models" / "bert-mini-config" / "bert_config.json"
    mini = json.loads(shared_config.read_text()) if shared_config.exists() else BERT_MINI_CONFIG
    vocab = ("\n".join(SHARED_VOCAB.read_text().splitlines() if SHARED_VOCAB.exists() else generated_vocab()) + "\n")
    for name, config in (("bert-mini", mini), ("bert-tiny", BERT_TINY_CONFIG)):
        assert "model_type" not in config
        torch.manual_seed(0)
        weights = io.BytesIO()
        torch.save(BertForPreTraining(BertConfig(**config)).state_dict(), weights)
        write_model_repo(hf_home, f"prajjwal1/{name}", {"config.json": json.dumps(config, indent=2).encode(),
                                                         "vocab.txt": vocab.encode(), "pytorch_model.bin": weights.getvalue()})

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    write_dataset_config(hf_home, "nyu-mll/glue", "sst2", sst2_splits(glue_dir), features)
    return hf_home


@pytest.fixture(params=[1, 3], ids=lambda threads: f"{threads}-threads")
def kernel_threads(request):
    """Runs a test of the CPU kernels on one thread and on three (their column blocks or rows split unevenly
    between the threads' partial sums), whatever the suite's own thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=["compiled", "panels"])
def update_form(request, monkeypatch):
    """Runs a test with the compiled factor update (as on the CPU) or with the panel form (as on other devices)."""
    if request.param == "panels":
        from mfac_optim import algebra
        monkeypatch.setattr(algebra, "cpu_passes", lambda: None)
    return request.param


@pytest.fixture(scope="session")
def learnable_task(tmp_path_factory, tiny_bert):
    """Generated SST-2-like data (the label is the sentiment word's), always learnable, and a tiny BERT initialised
    wider than BERT's 0.02 so that non-adaptive steps (SGD, M-FAC) also move it within a few hundred steps. Saved as
    a checkpoint, its pooler's bias is zero, as initialised: never trained."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("learnable")
    glue = write_generated_glue(root / "glue")
    model = root / "bert"
    model.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        (model / name).write_text((tiny_bert / name).read_text())
    config = BertConfig.from_pretrained(tiny_bert)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(model)
    return model, glue
