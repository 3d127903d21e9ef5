"""Model loading errors and flags; corpus splits, local files and batching."""

import json

import pytest
import torch

from var_moe.corpus import DatasetError, chunk_sequences, iter_documents, pad_batch, split_of
from var_moe.loading import LoadSpec, ModelLoadError, load_model


def test_loadspec_validates_flags():
    with pytest.raises(ValueError, match="--dtype"):
        LoadSpec(dtype="int3")
    with pytest.raises(ValueError, match="--device"):
        LoadSpec(device="tpu")
    with pytest.raises(ValueError, match="--quantization"):
        LoadSpec(quantization="2bit")
    assert LoadSpec().trust_remote_code is False


def test_quantization_on_cpu_is_a_clear_error(reference_model_dir):
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_model(str(reference_model_dir), quantization="4bit")


def test_quantization_without_bitsandbytes_is_a_clear_error(reference_model_dir, monkeypatch):
    """On a CUDA machine without bitsandbytes the loader says so before transformers is asked."""
    import importlib.util

    import var_moe.loading as loading

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(loading, "resolve_device", lambda device: "cuda")  # as if a GPU were present
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))

    def no_load(*a, **kw):  # the check must fire before any weights are read
        raise AssertionError("from_pretrained reached without bitsandbytes")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_load)
    for bits in ("4bit", "8bit"):
        with pytest.raises(ModelLoadError, match=f"--quantization {bits} needs the bitsandbytes package"):
            load_model(str(reference_model_dir), quantization=bits)


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="nope"):
        load_model(str(missing))


def test_splits_are_deterministic_and_disjoint():
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    ids = {s: {d.doc_id for d in iter_documents("stdlib", s, limit=200)} for s in ("train", "calibration", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["calibration"] & ids["test"])
    assert all(split_of(i) == "test" for i in ids["test"])
    assert not any("site-packages" in i for s in ids.values() for i in s)


def test_local_jsonl_and_txt(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    docs = list(iter_documents(str(tmp_path)))
    assert sorted(d.text for d in docs) == ["hello world", "one", "two"]
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(DatasetError, match="bad.jsonl:1"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    with pytest.raises(DatasetError, match="--split"):
        list(iter_documents("stdlib", "validation"))


def test_chunks_never_cross_documents_and_padding_mask():
    pieces = list(chunk_sequences([[1, 2, 3, 4, 5], [6, 7, 8]], 2))
    assert pieces == [[1, 2], [3, 4], [6, 7]]  # single-token tails predict nothing and are dropped
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_unreachable_hub_dataset_is_a_clear_error():
    # the suite runs with HF_HUB_OFFLINE=1 (conftest), as on a machine without the hub
    with pytest.raises(DatasetError, match="'c4'.*could not be streamed"):
        list(iter_documents("c4", "test", limit=1))


def test_chunked_tokenizing_does_not_warn_about_the_context(reference_model_dir):
    """Whole documents are longer than the context on purpose (they are chunked): transformers'
    "Token indices sequence length is longer than ... indexing errors" must not be printed."""
    import logging

    from transformers import AutoTokenizer

    from var_moe.corpus import Document, tokenize_documents
    from var_moe.var.evaluate import eval_batches

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        def fresh():  # transformers warns once per tokenizer object: each check gets a new one
            return AutoTokenizer.from_pretrained(str(reference_model_dir))

        long_doc = Document("long.py", "def f(x):\n    return x + 1\n" * 400)
        ids = next(tokenize_documents(fresh(), [long_doc]))
        assert len(ids) > fresh().model_max_length  # the case that used to warn
        eval_batches(fresh(), "stdlib", "test", num_samples=16, max_length=64, batch_size=8, max_per_doc=1)
        assert not [m for m in records if "indexing errors" in m], records
        fresh()(long_doc.text)  # the plain call does warn: the handler sees the message
        assert [m for m in records if "indexing errors" in m]
    finally:
        logging.getLogger("transformers").removeHandler(handler)
