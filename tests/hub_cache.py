"""Writes a Hugging Face cache as the Hub's clients leave it, so that tests can run Hub code paths offline
(HF_HOME + HF_HUB_OFFLINE=1): a model repository under hub/ and a prepared `datasets` config under datasets/."""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

# Any 40-hex commit: the clients only need refs/main to name the snapshot folder.
REVISION = "0123456789abcdef0123456789abcdef01234567"

# The cache's SST-2 training split: the first rows of GLUE's file. Runs from the cache read, tokenize and carve all
# of it; the whole file (67,349 rows) would cost the suite a minute without checking anything more.
SST2_TRAIN_ROWS = 2000


def sst2_splits(glue_dir: Path) -> dict[str, dict[str, list]]:
    """nyu-mll/glue sst2 as the cache holds it: the first SST2_TRAIN_ROWS training rows and every dev row of the
    TSV files in `glue_dir`, with GLUE's idx column, and a test split without labels (-1, as GLUE's)."""
    from mfac_glue import data as glue_data

    splits = {}
    for split, file, rows in (("train", "train.tsv", SST2_TRAIN_ROWS), ("validation", "dev.tsv", None)):
        columns = {name: values[:rows] for name, values in
                   glue_data.read_glue_tsv(str(glue_dir / "SST-2" / file), "sst2").items()}
        splits[split] = {**columns, "idx": list(range(len(columns["label"])))}
    unlabelled = splits["validation"]["sentence"][:16]
    splits["test"] = {"sentence": unlabelled, "label": [-1] * len(unlabelled), "idx": list(range(len(unlabelled)))}
    return splits


def write_model_repo(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """hub/models--org--name/: blobs named by their hash, snapshots/<revision>/ linking to them, refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def write_dataset_config(hf_home: Path, repo_id: str, config_name: str, splits: dict, features) -> Path:
    """datasets/<org>___<name>/<config>/0.0.0/<revision>/ with dataset_info.json and one Arrow file per split, as
    `load_dataset(repo_id, config_name)` leaves it after preparing the Hub's parquet files. `splits` maps a split
    name to its columns."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = repo_id.split("/")[-1]
    with tempfile.TemporaryDirectory() as work:
        files = {}
        for split, columns in splits.items():
            files[split] = os.path.join(work, f"{split}-00000-of-00001.parquet")
            datasets.Dataset.from_dict(columns, features=features).to_parquet(files[split])
        # The builder refuses local files for a Hub repo_id, so it prepares under the bare name and the folder
        # moves to where the Hub's namespace puts it; the files inside are named after `name` either way.
        builder = Parquet(cache_dir=os.path.join(work, "prepared"), dataset_name=name, config_name=config_name,
                          config_id=config_name, data_files=files, hash=REVISION, features=features)
        builder.download_and_prepare()
        destination = hf_home / "datasets" / repo_id.replace("/", "___") / config_name / "0.0.0" / REVISION
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(builder.cache_dir, destination)
    return destination
