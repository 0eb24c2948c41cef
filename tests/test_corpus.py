"""Corpora: the offline default is deterministic and big enough; local files go through datasets."""

import json

import pytest

from pipeline.lm.corpus import CorpusError, CorpusSpec, default_corpus_documents, fingerprint, iter_documents


def test_default_corpus_is_deterministic_deduplicated_and_large():
    docs = default_corpus_documents()
    assert len(docs) == len(set(docs)) > 1000
    chars = sum(map(len, docs))
    assert 1_500_000 < chars < 3_000_000
    digest = __import__("hashlib").sha256()
    for document in docs:  # the fingerprint's definition, recomputed independently
        digest.update(document.encode("utf-8") + b"\x00")
    assert fingerprint(CorpusSpec()) == "sha256:" + digest.hexdigest()
    assert list(iter_documents(CorpusSpec()))[:5] == list(docs[:5])


def test_jsonl_corpus_reads_the_text_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}", "id": i}) for i in range(5)))
    docs = list(iter_documents(CorpusSpec(source=str(path), text_column="body")))
    assert docs == [f"document {i}" for i in range(5)]


def test_parquet_corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", "", "beta"]}), path)
    assert list(iter_documents(CorpusSpec(source=str(path)))) == ["alpha", "beta"]


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}))
    with pytest.raises(CorpusError, match="no column 'text'.*--text-column"):
        list(iter_documents(CorpusSpec(source=str(path))))


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        list(iter_documents(CorpusSpec(source=str(tmp_path / "none.txt"))))


def test_unknown_hub_dataset_offline_is_one_clear_line():
    with pytest.raises(CorpusError) as info:
        list(iter_documents(CorpusSpec(source="nobody-owns-this/no-such-dataset")))
    assert "could not open dataset" in str(info.value)
