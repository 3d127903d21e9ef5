"""`varmoe download-model` and `varmoe prepare-datasets`, offline.

download-model: offline it exits 2 naming the model; quantization without CUDA is refused before
any download; with the hub replaced by a local folder (a fake `snapshot_download` that copies
what `allow_patterns` lets through) it writes a folder that loads, and never fetches pickled
weights. prepare-datasets: a local dataset becomes `DIR/<name>/data.jsonl` + manifest, which
`--dataset DIR/<name>` reads back with the same documents in the same splits.
Run: `pytest tests/test_hub_datasets.py` (about half a minute).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from var_moe import hub
from var_moe.cli import main as varmoe
from var_moe.corpus import iter_documents, split_of
from var_moe.dataset_files import prepare_dataset
from var_moe.errors import InvalidInputError

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "var_moe.cli", *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


# -- download-model ------------------------------------------------------------------------------
def test_offline_download_is_a_clear_error_naming_the_model(tmp_path):
    res = run_cli("download-model", "some-org/some-moe-model", "--output", str(tmp_path / "m"))
    assert res.returncode == 2, res.stderr
    assert "some-org/some-moe-model" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    assert "Traceback" not in res.stderr


def test_quantization_without_cuda_is_refused_before_downloading(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    monkeypatch.setattr(hub, "snapshot", lambda *a, **k: pytest.fail("downloaded before checking CUDA"))
    with pytest.raises(hub.DownloadError, match="--quantization 4bit needs a CUDA GPU"):
        hub.download_model("some-org/some-moe-model", tmp_path / "m", quantization="4bit")


def fake_hub(source: Path, monkeypatch, calls: list):
    """Replace the hub with `source`: copy the files `allow_patterns` matches into `local_dir`."""
    import huggingface_hub

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_download_writes_a_loadable_folder_without_pickles(tmp_path, monkeypatch, reference_model_dir, capsys):
    source = tmp_path / "hub-repo"
    shutil.copytree(reference_model_dir, source, ignore=shutil.ignore_patterns("var"))
    (source / "pytorch_model.bin").write_bytes(b"pickled weights: never fetched")
    (source / "training_args.pt").write_bytes(b"pickle")
    calls: list = []
    fake_hub(source, monkeypatch, calls)
    out = tmp_path / "local"
    assert varmoe(["download-model", "org/reference-moe", "--output", str(out), "--revision", "v1"]) == 0
    assert calls == [{"repo_id": "org/reference-moe", "revision": "v1", "allow_patterns": hub.ALLOW_PATTERNS}]
    printed = capsys.readouterr().out
    assert "a supported MoE (mixtral)" in printed and f"--model {out}" in printed
    assert not (out / "pytorch_model.bin").exists() and not (out / "training_args.pt").exists()
    assert (out / "model.safetensors").read_bytes() == (reference_model_dir / "model.safetensors").read_bytes()
    from var_moe.loading import load_model

    model, tok = load_model(str(out))
    assert model.config.model_type == "mixtral" and tok("def f():")["input_ids"]


def test_a_repo_without_safetensors_is_refused(tmp_path, monkeypatch, reference_model_dir):
    source = tmp_path / "hub-repo"
    source.mkdir()
    shutil.copy(reference_model_dir / "config.json", source)
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    fake_hub(source, monkeypatch, [])
    with pytest.raises(hub.DownloadError, match="no \\*.safetensors"):
        hub.download_model("org/pickles-only", tmp_path / "out")


def test_download_refuses_a_local_path_and_a_foreign_output_folder(tmp_path, reference_model_dir):
    with pytest.raises(InvalidInputError, match="local path"):
        hub.download_model(str(reference_model_dir), tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not a model folder"):
        hub.download_model("org/model", busy)


# -- prepare-datasets ----------------------------------------------------------------------------
@pytest.fixture
def local_dataset(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    with (src / "a.jsonl").open("w") as fh:
        for i in range(150):
            fh.write(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 3}) + "\n")
    (src / "b.txt").write_text("import os\nprint(os.getcwd())\n" * 5)
    return src


def test_prepared_local_dataset_reads_back_with_the_same_splits(tmp_path, local_dataset, capsys):
    out_dir = tmp_path / "prepared"
    assert varmoe(["prepare-datasets", "--dataset", str(local_dataset), "--output-dir", str(out_dir),
                   "--num-docs", "0"]) == 0
    folder = out_dir / "src"
    assert f"--dataset {folder}" in capsys.readouterr().out
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "data.jsonl").read_bytes()
    assert manifest["documents"] == 151 and manifest["sha256"] == hashlib.sha256(data).hexdigest()
    for split in ("train", "calibration", "test"):
        original = [(d.doc_id, d.text) for d in iter_documents(str(local_dataset), split)]
        copied = [(d.doc_id, d.text) for d in iter_documents(str(folder), split)]
        assert copied == original and all(split_of(i) == split for i, _ in copied)


def test_one_split_and_a_document_limit(tmp_path, local_dataset):
    result = prepare_dataset(str(local_dataset), tmp_path / "t", num_docs=5, split="test")
    rows = [json.loads(line) for line in (tmp_path / "t" / "data.jsonl").read_text().splitlines()]
    assert result.documents == len(rows) == 5 and all(split_of(r["doc_id"]) == "test" for r in rows)
    assert [d.doc_id for d in iter_documents(str(tmp_path / "t"), "test")] == [r["doc_id"] for r in rows]
    with pytest.raises(InvalidInputError, match="--num-docs"):
        prepare_dataset(str(local_dataset), tmp_path / "x", num_docs=-1)


def test_a_command_runs_on_the_prepared_folder(tmp_path, local_dataset, reference_model_dir):
    prepare_dataset(str(local_dataset), tmp_path / "p", num_docs=None)
    out = tmp_path / "stats.parquet"
    assert varmoe(["capture", "--model", str(reference_model_dir), "--dataset", str(tmp_path / "p"), "--split", "train",
                   "--num-samples", "4", "--max-length", "32", "--threads", "1", "--no-progress", "-o", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 0


def test_unreachable_hub_dataset_names_it(tmp_path):
    res = run_cli("prepare-datasets", "--dataset", "wikitext", "--output-dir", str(tmp_path / "d"), "--num-docs", "3")
    assert res.returncode == 2 and "wikitext" in res.stderr and "Traceback" not in res.stderr
    assert not [f for f in (tmp_path / "d").rglob("*") if f.is_file()]  # no partial file left behind
