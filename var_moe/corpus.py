"""Text corpora for training, capture and evaluation, and packing them into token batches.

Datasets by name:
- `stdlib` (default): the `.py` files of the running interpreter's standard library (its own
  source and docstrings; site-packages excluded), one document per file. Every machine has it,
  so anyone can rebuild the reference model and evaluate offline.
- `prose-code`: English prose and code, all offline: the Linux kernel's documentation (`.rst`/`.txt`
  from Debian's `linux-doc`, translations left out), Python's documentation (the reStructuredText
  sources from Debian's `python3-doc`) and the `stdlib` files above, one document per file. Ids are
  `linux-doc/<path>`, `python-doc/<path>` and the stdlib's own relative path, so a stdlib file falls
  in the same split in both datasets. Install: `apt-get install linux-doc python3-doc`.
- a local path: a `.txt` file (one document), a `.jsonl` file (field `text`; an optional string
  field `doc_id` is the document's id, as `varmoe prepare-datasets` writes), a `.parquet` file
  (column `text`), or a folder of such files.
- anything else is a Hugging Face dataset id, streamed (`c4`, `wikitext`, `slimpajama` are aliases).

Splits are deterministic: a document's split is decided by the SHA-256 of its id (the relative
path for stdlib), 80% train / 10% calibration / 10% test, so tables built on `calibration` are
measured on `test` without overlap. Test: `pytest tests/test_loading_corpus.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .errors import InvalidInputError

SPLITS = ("train", "calibration", "test")
_SPLIT_BOUNDS = (80, 90)  # percent: [0,80) train, [80,90) calibration, [90,100) test
HUB_ALIASES = {
    "c4": ("allenai/c4", "en"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "slimpajama": ("cerebras/SlimPajama-627B", None),
}
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MAX_DOC_BYTES = 400_000  # larger files (generated tables) would dominate a split
# Debian's documentation packages: where each keeps its reStructuredText, and the package to install
PROSE_CODE_ROOTS = {
    "linux-doc": (Path("/usr/share/doc/linux-doc/Documentation"), "linux-doc"),
    "python-doc": (Path("/usr/share/doc/python3-doc/html/_sources"), "python3-doc"),
}
_PROSE_SUFFIXES = (".rst", ".txt", ".rst.txt")
_PROSE_SKIP_DIRS = {"translations", "sphinx-static", "images"}  # non-English text, theme assets


class DatasetError(InvalidInputError):
    """A dataset name/path could not be read; the message names it."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def split_of(doc_id: str) -> str:
    """Deterministic split of a document id (stable across machines and Python versions)."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:4], "big") % 100
    if bucket < _SPLIT_BOUNDS[0]:
        return "train"
    return "calibration" if bucket < _SPLIT_BOUNDS[1] else "test"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise DatasetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    """(relative path, path) of each standard-library `.py` file small enough to be a document."""
    root = stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and path.stat().st_size <= MAX_DOC_BYTES:
                yield path.relative_to(root).as_posix(), path


def _read_text(path: Path) -> str | None:
    """A file's UTF-8 text (gunzipped when it ends in `.gz`); None when unreadable or too large."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (UnicodeDecodeError, OSError, EOFError):
        return None  # a few test fixtures are deliberately not UTF-8
    return text if len(raw) <= MAX_DOC_BYTES and text.strip() else None


def iter_stdlib(split: str | None = None) -> Iterator[Document]:
    for rel, path in _stdlib_files():
        if split is not None and split_of(rel) != split:
            continue
        text = _read_text(path)
        if text is not None:
            yield Document(rel, text)


def _prose_files(root: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """(id `prefix/<path without .gz>`, path) of each `.rst`/`.txt` file under `root`, gzipped or not."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in _PROSE_SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            rel = rel[:-3] if rel.endswith(".gz") else rel
            if rel.endswith(_PROSE_SUFFIXES):
                yield f"{prefix}/{rel}", path


def _hash_order(doc_id: str) -> bytes:
    return hashlib.sha256(b"order:" + doc_id.encode("utf-8")).digest()


def iter_prose_code(split: str | None = None, roots: dict[str, tuple[Path, str]] | None = None,
                    include_stdlib: bool = True) -> Iterator[Document]:
    """The `prose-code` dataset: Debian's kernel and Python documentation and the standard library.

    Documents come in the order of a hash of their id (independent of the split hash), so the
    first N sequences of a split are a sample of all sources, not of whichever source walks first.
    """
    roots = PROSE_CODE_ROOTS if roots is None else roots
    missing = sorted(pkg for root, pkg in roots.values() if not root.is_dir())
    if missing:
        raise DatasetError(f"dataset 'prose-code' needs Debian's {' and '.join(missing)}: "
                           f"apt-get install -y {' '.join(missing)} (or `make reference-moe-2`)")
    files = [f for prefix, (root, _pkg) in sorted(roots.items()) for f in _prose_files(root, prefix)]
    if include_stdlib:
        files += list(_stdlib_files())
    for doc_id, path in sorted(files, key=lambda f: _hash_order(f[0])):
        if split is not None and split_of(doc_id) != split:
            continue
        text = _read_text(path)
        if text is not None:
            yield Document(doc_id, text)


def _iter_local_file(path: Path, base: Path) -> Iterator[Document]:
    rel = path.relative_to(base).as_posix() if path != base else path.name
    if path.suffix == ".txt":
        yield Document(rel, path.read_text(encoding="utf-8", errors="replace"))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DatasetError(f"{path}:{i + 1}: each line needs a string field 'text'")
                # files from `varmoe prepare-datasets` keep each document's original id, so its
                # split (hashed from the id) is the one it had in the source dataset
                doc_id = row.get("doc_id")
                yield Document(doc_id if isinstance(doc_id, str) and doc_id else f"{rel}#{i}", row["text"])
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DatasetError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
        for i, text in enumerate(table.column("text").to_pylist()):
            if isinstance(text, str):
                yield Document(f"{rel}#{i}", text)


def iter_local(path: Path, split: str | None = None) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"{path}: no .txt, .jsonl or .parquet files found")
    base = path if path.is_dir() else path.parent
    for f in files:
        for doc in _iter_local_file(f, base):
            if split is None or split_of(doc.doc_id) == split:
                yield doc


def iter_hub(name: str, split: str | None = None, text_field: str = "text") -> Iterator[Document]:
    """Stream a hub dataset; our split is applied by hashing each row's index within the 'train' split."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise DatasetError(f"dataset {name!r} could not be streamed from the hub: the `datasets` package is not "
                           "installed (pip install datasets)") from exc
    repo, subset = HUB_ALIASES.get(name, (name, None))
    try:
        stream = datasets.load_dataset(repo, subset, split="train", streaming=True)
        for i, row in enumerate(stream):
            doc_id = f"{repo}#{i}"
            if split is None or split_of(doc_id) == split:
                text = row.get(text_field)
                if isinstance(text, str) and text.strip():
                    yield Document(doc_id, text)
    except (OSError, ConnectionError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(
            f"dataset {name!r} is not a local path and could not be streamed from the hub ({type(exc).__name__}: {exc}). "
            "Use --dataset stdlib, or a local .txt/.jsonl/.parquet file or folder."
        ) from exc


def iter_documents(dataset: str = "stdlib", split: str | None = None, limit: int | None = None) -> Iterator[Document]:
    """Documents of `dataset` (name or path) in `split`, at most `limit` of them."""
    _check_split(split)
    if dataset == "stdlib":
        it: Iterable[Document] = iter_stdlib(split)
    elif dataset == "prose-code":
        it = iter_prose_code(split)
    elif Path(dataset).exists():
        it = iter_local(Path(dataset), split)
    elif os.sep in dataset and not dataset.count("/") == 1:
        raise DatasetError(f"--dataset {dataset!r}: no such file or folder")
    else:
        it = iter_hub(dataset, split)
    for i, doc in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield doc


def encode_document(tokenizer: Any, text: str, eos: bool = True) -> list[int]:
    """Token ids of a whole document (EOS appended so documents stay separated when packed).

    A document is longer than the model's context on purpose: `chunk_sequences` cuts it to
    `--max-length` before the model sees it. `verbose=False` keeps transformers from warning that
    the sequence "will result in indexing errors", which is untrue for chunked input.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    return ids + [eos_id] if eos and eos_id is not None else ids


def tokenize_documents(tokenizer: Any, docs: Iterable[Document], eos: bool = True) -> Iterator[list[int]]:
    """Token ids of each document (see `encode_document`); empty documents are skipped."""
    for doc in docs:
        ids = encode_document(tokenizer, doc.text, eos)
        if ids:
            yield ids


def chunk_sequences(token_lists: Iterable[list[int]], max_length: int) -> Iterator[list[int]]:
    """Cut each document into pieces of at most `max_length` tokens; no piece crosses documents."""
    if max_length < 2:
        raise InvalidInputError("--max-length must be at least 2")
    for ids in token_lists:
        for start in range(0, len(ids), max_length):
            piece = ids[start : start + max_length]
            if len(piece) >= 2:
                yield piece


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids_BS, attention_mask_BS)` with padding on `side`; mask is 0 on padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):  # a loop over sequences (not tokens) to build the batch
        sl = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, sl] = torch.tensor(seq, dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


def iter_batches(
    tokenizer: Any,
    dataset: str = "stdlib",
    split: str | None = "test",
    max_length: int = 256,
    batch_size: int = 8,
    num_samples: int | None = None,
    limit_docs: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded `(input_ids, attention_mask)` batches of up to `num_samples` sequences in total."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = chunk_sequences(tokenize_documents(tokenizer, iter_documents(dataset, split, limit_docs)), max_length)
    batch: list[list[int]] = []
    produced = 0
    for seq in seqs:
        if num_samples is not None and produced >= num_samples:
            break
        batch.append(seq)
        produced += 1
        if len(batch) == batch_size:
            yield pad_batch(batch, pad_id)
            batch = []
    if batch:
        yield pad_batch(batch, pad_id)
