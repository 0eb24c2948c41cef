"""Feature explanations and their scores in ``explanations.duckdb`` next to the feature index.

Tables:
  metadata(key, value)        JSON values: format version, the SAE weights' sha256
  explanations(explanation_id, feature, explainer, model, prompt_hash, text, token_kind, tokens, token_set, n_train)
  scores(explanation_id, feature, scorer, metric, value, control_value, control_feature, test_hash,
         n_positive, n_negative, n_random_negative, n_hard_negative)
  predictions(explanation_id, scorer, control, test_hash, keys, labels, predictions)   per test example, to audit
  vectors(explanation_id, feature, explanation_vector, examples_vector)   unit MiniLM embeddings for search
  done(feature, settings_hash)   features a run with these settings finished (also those it could not explain)

Rows are keyed, never overwritten: an explanation by a hash of what produced it, a
score by (explanation, scorer, metric, test settings). Each ``append`` publishes
a whole batch atomically: the current file is copied, the batch inserted
(skipping keys already present), and the copy renamed over the file. A killed
job loses at most the batch in flight, and readers holding the old file open
keep reading it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from storage.constants import EXPLANATIONS
from storage.errors import first_line
from storage.read_only import open_read_only

FORMAT_VERSION = 1

_SCHEMA = {
    "explanations": "explanation_id VARCHAR, feature INTEGER, explainer VARCHAR, model VARCHAR, prompt_hash VARCHAR, "
    "text VARCHAR, token_kind VARCHAR, tokens VARCHAR[], token_set VARCHAR, n_train INTEGER",
    "scores": "explanation_id VARCHAR, feature INTEGER, scorer VARCHAR, metric VARCHAR, value DOUBLE, "
    "control_value DOUBLE, control_feature INTEGER, test_hash VARCHAR, n_positive INTEGER, n_negative INTEGER, "
    "n_random_negative INTEGER, n_hard_negative INTEGER",
    "predictions": "explanation_id VARCHAR, scorer VARCHAR, control BOOLEAN, test_hash VARCHAR, keys BIGINT[], "
    "labels BOOLEAN[], predictions FLOAT[]",
    "vectors": "explanation_id VARCHAR, feature INTEGER, explanation_vector FLOAT[], examples_vector FLOAT[]",
    "done": "feature INTEGER, settings_hash VARCHAR",
}
_KEYS = {
    "explanations": ["explanation_id"],
    "scores": ["explanation_id", "scorer", "metric", "test_hash"],
    "predictions": ["explanation_id", "scorer", "control", "test_hash"],
    "vectors": ["explanation_id"],
    "done": ["feature", "settings_hash"],
}


class ExplanationStoreError(ValueError):
    """The explanations file is damaged or belongs to other SAE weights."""


def explanations_path(sae_folder: Path) -> Path:
    return Path(sae_folder) / EXPLANATIONS


@dataclass
class ExplanationBatch:
    """Rows to append, one list of dicts per table."""

    rows: dict[str, list[dict]] = field(default_factory=lambda: {name: [] for name in _SCHEMA})

    def add(self, table: str, **row) -> None:
        self.rows[table].append(row)


def _arrow(rows: list[dict]) -> pa.Table:
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    return pa.table({k: pa.array([_plain(v) for v in values]) for k, values in columns.items()})


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


class ExplanationStore:
    """The writer: owns ``explanations.duckdb`` of one SAE while a job holds the explain lock."""

    def __init__(self, sae_folder: Path, fingerprint: str):
        self.path = explanations_path(sae_folder)
        self.fingerprint = fingerprint
        for stale in Path(sae_folder).glob(f".{EXPLANATIONS}.*.tmp*"):
            stale.unlink(missing_ok=True)
        if self.path.exists():
            with ExplanationReader(self.path) as reader:
                built_for = reader.metadata.get("weights_sha256")
            if built_for != fingerprint:
                raise ExplanationStoreError(
                    f"{self.path} holds explanations of other weights (the SAE was retrained or replaced): "
                    "delete it and re-run `saescope explain`"
                )

    def done_features(self, settings_hash: str) -> set[int]:
        if not self.path.exists():
            return set()
        with ExplanationReader(self.path) as reader:
            return reader.done_features(settings_hash)

    def append(self, batch: ExplanationBatch) -> None:
        """Insert the batch's new rows and publish the file atomically."""
        tmp = self.path.with_name(f".{EXPLANATIONS}.{os.getpid()}.tmp")
        try:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            con = duckdb.connect(str(tmp))
            try:
                self._insert(con, batch)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            Path(f"{tmp}.wal").unlink(missing_ok=True)

    def _insert(self, con, batch: ExplanationBatch) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS metadata (key VARCHAR, value VARCHAR)")
        con.execute("DELETE FROM metadata")
        meta = {"format_version": FORMAT_VERSION, "weights_sha256": self.fingerprint}
        con.executemany("INSERT INTO metadata VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        for table, schema in _SCHEMA.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({schema})")
            rows = batch.rows.get(table) or []
            if not rows:
                continue
            con.register("batch_rows", _arrow(rows))
            names = ", ".join(rows[0])
            on = " AND ".join(f"t.{k} = b.{k}" for k in _KEYS[table])
            con.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM batch_rows b "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {on})"
            )
            con.unregister("batch_rows")


class ExplanationReader:
    """Read-only queries: a feature's explanations and scores, labels for tables, search by meaning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.closed = False
        try:
            self.con = open_read_only(self.path)
            rows = self.con.execute("SELECT key, value FROM metadata").fetchall()
            self.metadata = {k: json.loads(v) for k, v in rows}
        except (duckdb.Error, ValueError) as error:
            raise ExplanationStoreError(
                f"{self.path} is damaged ({first_line(error)}): delete it and re-run `saescope explain`"
            ) from error

    def close(self) -> None:
        with self._lock:
            self.con.close()
            self.closed = True

    def __enter__(self) -> ExplanationReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, sql: str, params: list) -> list[dict]:
        with self._lock:
            if self.closed:
                raise ExplanationStoreError(f"{self.path} was closed while this page was loading: reload the page")
            cursor = self.con.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def done_features(self, settings_hash: str) -> set[int]:
        rows = self._rows("SELECT feature FROM done WHERE settings_hash = ?", [settings_hash])
        return {row["feature"] for row in rows}

    def for_feature(self, feature: int) -> list[dict]:
        """Every explanation of a feature, each with its scores [{scorer, metric, value, control_value, ...}]."""
        explanations = self._rows("SELECT * FROM explanations WHERE feature = ? ORDER BY explainer, model", [feature])
        scores = self._rows("SELECT * FROM scores WHERE feature = ? ORDER BY scorer, metric, test_hash", [int(feature)])
        for explanation in explanations:
            explanation["scores"] = [s for s in scores if s["explanation_id"] == explanation["explanation_id"]]
        return explanations

    def labels(self, features: list[int]) -> dict[int, dict]:
        """One explanation per listed feature (the best simulation AUROC), with that score and its control."""
        if not features:
            return {}
        sql = """SELECT e.feature, e.text, e.explainer, e.token_kind, e.tokens, s.value AS auroc,
                        s.control_value AS control_auroc
                 FROM explanations e LEFT JOIN scores s
                   ON s.explanation_id = e.explanation_id AND s.scorer = 'simulation' AND s.metric = 'auroc'
                 WHERE list_contains(?, e.feature)
                 QUALIFY row_number() OVER (PARTITION BY e.feature ORDER BY s.value DESC NULLS LAST,
                                            e.explainer, e.text) = 1"""
        return {row["feature"]: row for row in self._rows(sql, [[int(f) for f in features]])}

    def search(self, query_vector, limit: int = 20) -> list[dict]:
        """Features ranked by cosine of the query with their explanation and top-example embeddings (mean of both)."""
        vector = [float(v) for v in np.asarray(query_vector, dtype=np.float32)]
        array = f"FLOAT[{len(vector)}]"
        sql = f"""SELECT v.feature, e.text,
                         array_cosine_similarity(v.explanation_vector::{array}, ?::{array}) AS explanation,
                         array_cosine_similarity(v.examples_vector::{array}, ?::{array}) AS examples
                  FROM vectors v JOIN explanations e USING (explanation_id)
                  QUALIFY row_number() OVER (PARTITION BY v.feature ORDER BY explanation + examples DESC) = 1
                  ORDER BY (explanation + examples) / 2 DESC, v.feature LIMIT ?"""
        rows = self._rows(sql, [vector, vector, int(limit)])
        for row in rows:
            row["similarity"] = (row["explanation"] + row["examples"]) / 2
        return rows

    def score_table(self, explanation_ids: list[str], test_hash: str) -> list[dict]:
        """The scores (with controls) of the listed explanations under one test setting, for reports."""
        return self._rows(
            """SELECT s.*, e.text FROM scores s JOIN explanations e USING (explanation_id)
               WHERE list_contains(?, s.explanation_id) AND s.test_hash = ?
               ORDER BY s.feature, s.scorer, s.metric""",
            [list(explanation_ids), test_hash],
        )


def open_explanations(sae_folder: Path, fingerprint: str) -> ExplanationReader | None:
    """The SAE's explanations, or None when there are none for the weights it holds now."""
    path = explanations_path(sae_folder)
    if not path.is_file():
        return None
    reader = ExplanationReader(path)
    if reader.metadata.get("weights_sha256") != fingerprint:
        reader.close()
        return None
    return reader
