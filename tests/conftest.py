"""Shared fixtures: a tiny BERT folder and GLUE-format data, real from ../shared when it is there, else generated."""
import random
from pathlib import Path

import pytest

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
