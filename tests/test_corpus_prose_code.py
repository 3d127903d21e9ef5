"""The `prose-code` dataset on a small synthetic copy of Debian's documentation folders.

Checks file selection (`.rst`/`.txt`, gzipped or not; translations and YAML left out), document
ids, the split by document, the hashed document order, and the error naming the missing package.
Needs neither `linux-doc` nor `python3-doc`: the roots are passed in."""

import gzip

import pytest

from var_moe.corpus import DatasetError, iter_prose_code, split_of


@pytest.fixture()
def roots(tmp_path):
    linux = tmp_path / "linux" / "Documentation"
    python = tmp_path / "python" / "html" / "_sources"
    for i in range(40):
        sub = linux / f"sub{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"page{i}.rst.gz").write_bytes(gzip.compress(f"Kernel page {i}\n=====\n\nSome prose {i}.\n".encode()))
    (linux / "memory-barriers.txt").write_text("plain text prose\n")
    (linux / "translations" / "zh_CN").mkdir(parents=True)
    (linux / "translations" / "zh_CN" / "index.rst").write_text("not English\n")
    (linux / "bindings.yaml.gz").write_bytes(gzip.compress(b"key: value\n"))
    (linux / "conf.py.gz").write_bytes(gzip.compress(b"x = 1\n"))
    (linux / "broken.rst.gz").write_bytes(b"not gzip at all")
    (linux / "empty.rst").write_text("   \n")
    (python / "library").mkdir(parents=True)
    for i in range(20):
        (python / "library" / f"mod{i}.rst.txt").write_text(f":mod:`mod{i}` --- a module\n\nText {i}.\n")
    return {"linux-doc": (linux, "linux-doc"), "python-doc": (python, "python3-doc")}


def test_selects_prose_files_with_stable_ids(roots):
    docs = list(iter_prose_code(roots=roots, include_stdlib=False))
    ids = {d.doc_id for d in docs}
    assert len(docs) == len(ids) == 40 + 1 + 20
    assert "linux-doc/sub1/page5.rst" in ids and "linux-doc/memory-barriers.txt" in ids
    assert "python-doc/library/mod3.rst.txt" in ids
    assert not any("translations" in i or "yaml" in i or "conf.py" in i or "broken" in i or "empty" in i for i in ids)
    by_id = {d.doc_id: d.text for d in docs}
    assert by_id["linux-doc/sub1/page5.rst"].startswith("Kernel page 5")  # gunzipped


def test_split_is_by_document_and_order_mixes_sources(roots):
    splits = {s: list(iter_prose_code(s, roots=roots, include_stdlib=False)) for s in ("train", "calibration", "test")}
    every = list(iter_prose_code(roots=roots, include_stdlib=False))
    assert sum(len(v) for v in splits.values()) == len(every)
    for s, docs in splits.items():
        assert all(split_of(d.doc_id) == s for d in docs)
    # hashed order: the python docs are not all after the kernel docs
    sources = [d.doc_id.split("/")[0] for d in every]
    first_python = sources.index("python-doc")
    assert "linux-doc" in sources[first_python:]
    assert [d.doc_id for d in every] == [d.doc_id for d in iter_prose_code(roots=roots, include_stdlib=False)]


def test_stdlib_files_keep_their_stdlib_split(roots):
    docs = [d for d in iter_prose_code("test", roots=roots) if not d.doc_id.startswith(("linux-doc/", "python-doc/"))]
    assert docs and all(split_of(d.doc_id) == "test" and d.doc_id.endswith(".py") for d in docs)


def test_missing_package_is_named(tmp_path, roots):
    roots = dict(roots, **{"python-doc": (tmp_path / "absent", "python3-doc")})
    with pytest.raises(DatasetError, match="python3-doc.*apt-get install -y python3-doc"):
        list(iter_prose_code(roots=roots))
