"""Samples of datasets as local files, for reproducible offline runs (`varmoe prepare-datasets`).

`prepare_dataset(dataset, output, num_docs=..., split=None)` reads documents the way every command
does (`var_moe.corpus.iter_documents`: `c4`, `wikitext`, `slimpajama` or any hub id streamed, a
local file or folder, or `stdlib`) and writes `output/data.jsonl` (one `{"doc_id", "text"}` per
line) plus `output/manifest.json` (source, split, document count, characters, SHA-256 of the data
file). The original `doc_id` is kept, so `--dataset output` later gives every document the split
it had in the source: the test split of the local copy is the source's test split, offline.
Test: `pytest tests/test_hub_datasets.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .corpus import HUB_ALIASES, SPLITS, DatasetError, iter_documents
from .errors import InvalidInputError

DATA_FILE = "data.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class PreparedDataset:
    source: str  # the --dataset value as given (alias, hub id, path)
    hub_id: str | None  # the hub repository an alias stands for
    split: str | None  # None = documents of every split (each keeps its own)
    documents: int
    characters: int
    sha256: str  # of data.jsonl
    path: str  # the data file, beside the manifest
    created_unix: float


def folder_name(dataset: str) -> str:
    """A folder name for a dataset: `c4`, `org__name`, or a local path's last part."""
    name = Path(dataset).name if Path(dataset).exists() else dataset.replace("/", "__")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "dataset"


def prepare_dataset(dataset: str, output: str | Path, num_docs: int | None = 1000, split: str | None = None,
                    min_chars: int = 1) -> PreparedDataset:
    """Write up to `num_docs` documents of `dataset` (in `split`, or all) to `output`; see the module doc."""
    if num_docs is not None and num_docs < 1:
        raise InvalidInputError(f"--num-docs must be at least 1, got {num_docs}")
    if split is not None and split not in SPLITS:
        raise InvalidInputError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--output {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    data = out / DATA_FILE
    tmp = data.with_suffix(".jsonl.partial")  # a broken stream never leaves a short data.jsonl behind
    digest, docs, chars = hashlib.sha256(), 0, 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for doc in iter_documents(dataset, split):
                if num_docs is not None and docs >= num_docs:
                    break
                if len(doc.text) < min_chars:
                    continue
                line = json.dumps({"doc_id": doc.doc_id, "text": doc.text}, ensure_ascii=False) + "\n"
                fh.write(line)
                digest.update(line.encode("utf-8"))
                docs, chars = docs + 1, chars + len(doc.text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if docs == 0:
        tmp.unlink()
        raise DatasetError(f"--dataset {dataset!r} gave no documents" + (f" in split {split!r}" if split else ""))
    tmp.replace(data)
    hub_id = HUB_ALIASES[dataset][0] if dataset in HUB_ALIASES else None
    result = PreparedDataset(dataset, hub_id, split, docs, chars, digest.hexdigest(), DATA_FILE, time.time())
    (out / MANIFEST_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result
