"""Read-only queries over a feature index: what a feature page, a feature list and a search need.

Every function is a handful of indexed lookups (tables are sorted by feature, so
DuckDB's zone maps narrow a ``WHERE feature = ?`` to one row group). Token ids
are decoded through the index's own ``vocab`` table.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc

from storage.constants import FEATURE_INDEX
from storage.errors import first_line
from storage.read_only import open_read_only
from storage.sae_store import weights_fingerprint
from storage.transcoder_store import layer_dir

SORT_COLUMNS = {"density": "density", "max": "max_act", "mean": "mean_act", "id": "feature"}


class FeatureIndexError(ValueError):
    """The index is missing, or a query asks for something it does not hold."""


@dataclass(frozen=True)
class Example:
    """One example of a feature: a window of tokens and the feature's activation on each."""

    kind: str
    """"top", "width" (equal-width bin) or "quantile" (equal-count bin)."""
    bin: int
    rank: int
    context: int
    position: int
    """Position of the example's token in its context."""
    activation: float
    tokens: list[str]
    """Decoded tokens of the window."""
    acts: list[float]
    """The feature's activation on each window token."""
    peak: int
    """Index of the example's token within ``tokens``."""
    token_ids: tuple[int, ...] = ()
    """Token ids of the window (what ``tokens`` decodes)."""


class FeatureIndex:
    """A read-only connection to ``features.duckdb`` with the query API."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise FeatureIndexError(f"no feature index at {path}: run `saescope index` first")
        self.path = path
        self._lock = threading.Lock()  # one DuckDB connection is not safe to share between threads
        self.closed = False
        try:
            self.con = open_read_only(path)
            rows = self.con.execute("SELECT key, value FROM metadata").fetchall()
            self.metadata = {k: json.loads(v) for k, v in rows}
            self.n_features = self.con.execute("SELECT count(*) FROM features").fetchone()[0]
            self.vocab = [text for (text,) in self.con.execute("SELECT text FROM vocab ORDER BY token_id").fetchall()]
            self.window = int(self.metadata["index"]["window"])
            self.ctx_len = int(self.metadata["index"]["ctx_len"])
            tables = self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()
            self.has_standardized_effects = ("logit_effects_std",) in tables  # absent from older indexes
            columns = self.con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'features'"
            ).fetchall()
            self.has_dense = ("dense",) in columns  # transcoder indexes only
        except (duckdb.Error, KeyError, ValueError) as error:
            raise FeatureIndexError(
                f"{path} is damaged or not a feature index ({first_line(error)}): rebuild it with `saescope index`"
            ) from error

    @classmethod
    def for_sae(cls, sae_folder: Path, fingerprint: str) -> FeatureIndex:
        """Open the index of an SAE, refusing one built from other weights (``fingerprint`` of the weights now)."""
        index = cls(Path(sae_folder) / FEATURE_INDEX)
        built_from = index.metadata.get("sae", {}).get("weights_sha256")
        if built_from != fingerprint:
            index.close()
            raise FeatureIndexError(
                f"{index.path} was built from other weights than {Path(sae_folder).name!r} holds now "
                f"(the SAE was retrained or replaced): rebuild it with `saescope index --sae {Path(sae_folder).name}`"
            )
        return index

    def close(self) -> None:
        with self._lock:
            self.con.close()
            self.closed = True

    def __enter__(self) -> FeatureIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_feature(self, feature: int) -> int:
        if not isinstance(feature, int) or not 0 <= feature < self.n_features:
            raise FeatureIndexError(
                f"feature {feature} out of range: this SAE has {self.n_features} features (0-{self.n_features - 1})"
            )
        return feature

    def decode(self, token_ids: list[int]) -> list[str]:
        return [self.vocab_text(t) for t in token_ids]

    def vocab_text(self, token_id: int) -> str:
        """The single-token decode of ``token_id`` (``<id>`` for ids outside the vocabulary)."""
        return self.vocab[token_id] if 0 <= token_id < len(self.vocab) else f"<{token_id}>"

    def _rows(self, sql: str, params: list) -> list[dict]:
        with self._lock:
            if self.closed:
                raise FeatureIndexError(f"{self.path} was replaced while this page was loading: reload the page")
            cursor = self.con.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        return [dict(zip(names, row, strict=True)) for row in rows]

    def logit_tokens(self, feature: int, ranking: str = "standardized") -> dict[str, list[dict]]:
        """Top promoted and suppressed tokens: [{"token", "raw", "z"}] ranked by z-score or by raw effect."""
        if ranking not in ("standardized", "raw"):
            raise FeatureIndexError(f"unknown ranking {ranking!r}: use 'standardized' or 'raw'")
        self.check_feature(feature)
        if ranking == "standardized" and self.has_standardized_effects:
            row = self._rows("SELECT * FROM logit_effects_std WHERE feature = ?", [feature])[0]
            return {
                side: [
                    {"token": self.vocab_text(i), "token_id": int(i), "raw": float(r), "z": float(z)}
                    for i, r, z in zip(row[f"{side}_ids"], row[f"{side}_raw"], row[f"{side}_z"], strict=True)
                ]
                for side in ("promoted", "suppressed")
            }
        row = self._rows("SELECT * FROM logit_effects WHERE feature = ?", [feature])[0]
        return {
            side: [
                {"token": self.vocab_text(i), "token_id": int(i), "raw": float(v), "z": None}
                for i, v in zip(row[f"{side}_ids"], row[f"{side}_values"], strict=True)
            ]
            for side in ("promoted", "suppressed")
        }

    def typical_activations(self, features: list[int]) -> dict[int, tuple[float, float]]:
        """feature -> (max activation, mean activation when active) over the indexed tokens."""
        for feature in features:
            self.check_feature(feature)
        rows = self._rows(
            "SELECT feature, max_act, mean_act FROM features WHERE feature IN (SELECT unnest(?))", [list(features)]
        )
        return {int(r["feature"]): (float(r["max_act"]), float(r["mean_act"])) for r in rows}

    def dense_count(self) -> int:
        """How many features the index marks dense (0 for an index without the mark)."""
        if not self.has_dense:
            return 0
        return int(self._rows("SELECT count(*) AS n FROM features WHERE dense", [])[0]["n"])

    def densities(self, features: list[int]) -> dict[int, tuple[float, bool]]:
        """feature -> (density, dense mark) for the listed features (the mark is False without one)."""
        for feature in features:
            self.check_feature(feature)
        dense = "dense" if self.has_dense else "FALSE"
        rows = self._rows(
            f"SELECT feature, density, {dense} AS dense FROM features WHERE list_contains(?, feature)",
            [[int(f) for f in features]],
        )
        return {int(r["feature"]): (float(r["density"]), bool(r["dense"])) for r in rows}

    def peak_tokens(self, features: list[int], top_n: int = 3) -> dict[int, list[int]]:
        """feature -> the ``top_n`` token ids its top examples peak on most often (ties: the stronger example)."""
        for feature in features:
            self.check_feature(feature)
        sql = """SELECT feature, list(token_id ORDER BY n DESC, best DESC, token_id) AS ids FROM (
                   SELECT feature, token_id, count(*) AS n, max(activation) AS best FROM examples
                   WHERE kind = 'top' AND list_contains(?, feature) GROUP BY ALL)
                 GROUP BY feature"""
        rows = self._rows(sql, [[int(f) for f in features]])
        found = {int(r["feature"]): [int(t) for t in r["ids"][:top_n]] for r in rows}
        return {int(f): found.get(int(f), []) for f in features}

    def promoted_tokens(self, features: list[int], top_n: int = 3) -> dict[int, list[int]]:
        """feature -> its ``top_n`` promoted token ids, standardised ranking where the index has it."""
        for feature in features:
            self.check_feature(feature)
        effects = "logit_effects_std" if self.has_standardized_effects else "logit_effects"
        rows = self._rows(
            f"SELECT feature, promoted_ids[1:{int(top_n)}] AS ids FROM {effects} WHERE list_contains(?, feature)",
            [[int(f) for f in features]],
        )
        return {int(r["feature"]): [int(t) for t in r["ids"]] for r in rows}

    def summary(self, feature: int, ranking: str = "standardized") -> dict:
        """Statistics, histogram, logit effects and nearest features of one feature.

        ``promoted``/``suppressed`` are (token, raw effect) pairs in the chosen ranking.
        """
        self.check_feature(feature)
        stats = self._rows("SELECT * FROM features WHERE feature = ?", [feature])[0]
        hist = self._rows("SELECT bin_width, counts FROM histograms WHERE feature = ?", [feature])
        effects = self.logit_tokens(feature, ranking)
        near = self._rows("SELECT neighbour_ids, cosines FROM neighbours WHERE feature = ?", [feature])[0]
        return {
            **stats,
            "histogram": hist[0] if hist else {"bin_width": 0.0, "counts": []},
            "promoted": [(e["token"], e["raw"]) for e in effects["promoted"]],
            "suppressed": [(e["token"], e["raw"]) for e in effects["suppressed"]],
            "neighbours": list(zip(near["neighbour_ids"], near["cosines"], strict=True)),
        }

    def _examples(self, feature: int, kind: str, limit: int | None = None) -> list[Example]:
        sql = """SELECT e.*, c.tokens FROM examples e JOIN contexts c USING (context)
                 WHERE e.feature = ? AND e.kind = ? ORDER BY e.bin, e.rank"""
        rows = self._rows(sql + (f" LIMIT {int(limit)}" if limit else ""), [feature, kind])
        return [self._example(row) for row in rows]

    def _example(self, row: dict) -> Example:
        start = row["window_start"]
        end = min(len(row["tokens"]), row["position"] + self.window + 1)
        acts = [0.0] * (end - start)
        for offset, value in zip(row["window_offsets"] or [], row["window_values"] or [], strict=True):
            acts[offset] = float(value)
        return Example(
            kind=row["kind"],
            bin=row["bin"],
            rank=row["rank"],
            context=row["context"],
            position=row["position"],
            activation=float(row["activation"]),
            tokens=self.decode(row["tokens"][start:end]),
            acts=acts,
            peak=row["position"] - start,
            token_ids=tuple(int(t) for t in row["tokens"][start:end]),
        )

    def top_examples(self, feature: int, limit: int = 20) -> list[Example]:
        """Highest-activating examples (one per context), strongest first."""
        return self._examples(self.check_feature(feature), "top", limit)

    def interval_examples(self, feature: int, kind: str = "quantile", per_bin: int = 3) -> list[dict]:
        """Per bin ("width" or "quantile"): its range, how many activations fell in it, and ``per_bin`` examples."""
        if kind not in ("width", "quantile"):
            raise FeatureIndexError(f"unknown bin kind {kind!r}: use 'width' or 'quantile'")
        self.check_feature(feature)
        bins = self._rows(
            "SELECT bin, lower, upper, n_activations FROM interval_bins WHERE feature = ? AND kind = ? ORDER BY bin",
            [feature, kind],
        )
        examples = self._examples(feature, kind)
        for entry in bins:
            entry["examples"] = [e for e in examples if e.bin == entry["bin"] and e.rank < per_bin]
        return bins

    def list_features(
        self,
        sort: str = "density",
        descending: bool = True,
        dead: bool | None = None,
        min_density: float | None = None,
        max_density: float | None = None,
        limit: int = 50,
        offset: int = 0,
        token: str | None = None,
    ) -> list[dict]:
        """A page of features with their statistics and top promoted tokens.

        With ``token``, only features whose top examples peak on it or whose top promoted
        tokens include it (see ``search_tokens``).
        """
        if sort not in SORT_COLUMNS:
            raise FeatureIndexError(f"unknown sort {sort!r}: use one of {', '.join(SORT_COLUMNS)}")
        where, params = ["TRUE"], []
        if token is not None:
            where.append("f.feature IN (SELECT feature FROM token_features WHERE list_contains(?, token_id))")
            params.append(self.token_ids_matching(token))
        if dead is not None:
            where.append("f.dead = ?")
            params.append(dead)
        if min_density is not None:
            where.append("f.density >= ?")
            params.append(min_density)
        if max_density is not None:
            where.append("f.density <= ?")
            params.append(max_density)
        order = f"f.{SORT_COLUMNS[sort]} {'DESC' if descending else 'ASC'}, f.feature"
        effects = "logit_effects_std" if self.has_standardized_effects else "logit_effects"
        sql = (
            f"SELECT f.*, l.promoted_ids[1:5] AS top_ids FROM features f JOIN {effects} l USING (feature) "
            f"WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ? OFFSET ?"
        )
        return self._with_promoted(self._rows(sql, [*params, int(limit), int(offset)]))

    def stats_of(self, features: list[int]) -> dict[int, dict]:
        """feature -> the row ``list_features`` gives it, for the listed features."""
        effects = "logit_effects_std" if self.has_standardized_effects else "logit_effects"
        sql = (
            f"SELECT f.*, l.promoted_ids[1:5] AS top_ids FROM features f JOIN {effects} l USING (feature) "
            "WHERE list_contains(?, f.feature)"
        )
        rows = self._with_promoted(self._rows(sql, [[int(f) for f in features]]))
        return {row["feature"]: row for row in rows}

    def _with_promoted(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            row["promoted_ids"] = [int(t) for t in row.pop("top_ids")]
            row["promoted"] = self.decode(row["promoted_ids"])
        return rows

    def token_ids_matching(self, text: str) -> list[int]:
        """Vocabulary ids whose decoded token equals ``text``, ignoring case and surrounding whitespace."""
        wanted = text.strip().lower()
        if not wanted:
            raise FeatureIndexError("search text is empty")
        return [i for i, t in enumerate(self.vocab) if t.strip().lower() == wanted]

    def search_tokens(self, text: str, limit: int = 50) -> list[dict]:
        """Features whose top examples peak on, or whose top promoted tokens include, a token matching ``text``.

        Matching ignores case and surrounding whitespace of the decoded token.
        """
        ids = self.token_ids_matching(text)
        if not ids:
            return []
        sql = """SELECT feature, sum(hits) AS hits, bool_or(source = 'example') AS in_examples,
                        bool_or(source = 'logit') AS in_promoted
                 FROM token_features WHERE list_contains(?, token_id)
                 GROUP BY feature ORDER BY hits DESC, feature LIMIT ?"""
        return self._rows(sql, [ids, int(limit)])

    def interesting(self, limit: int = 5, min_density: float = 1e-3, max_density: float = 5e-2) -> list[int]:
        """Live features of moderate density whose top examples mostly peak on one token (easy to read first).

        Score: the share of a feature's top examples whose peak token is its most common
        peak token; ties go to the higher maximum activation.
        """
        sql = """WITH peaks AS (
                   SELECT e.feature, e.token_id, count(*) AS n FROM examples e JOIN features f USING (feature)
                   WHERE e.kind = 'top' AND NOT f.dead AND f.density BETWEEN ? AND ? GROUP BY ALL),
                 shares AS (
                   SELECT feature, max(n) / sum(n) AS share, sum(n) AS total FROM peaks GROUP BY feature)
                 SELECT s.feature FROM shares s JOIN features f USING (feature) WHERE s.total >= 5
                 ORDER BY s.share DESC, f.max_act DESC, s.feature LIMIT ?"""
        return [row["feature"] for row in self._rows(sql, [min_density, max_density, int(limit)])]

    def random_live(self, seed: int) -> int | None:
        """A live feature chosen by ``seed`` (None when every feature is dead)."""
        rows = self._rows("SELECT feature FROM features WHERE NOT dead ORDER BY feature", [])
        if not rows:
            return None
        return rows[seed % len(rows)]["feature"]

    def top_snippets(self, features: list[int]) -> dict[int, Example]:
        """The strongest example of each listed feature (for tables)."""
        if not features:
            return {}
        sql = """SELECT e.*, c.tokens FROM examples e JOIN contexts c USING (context)
                 WHERE e.kind = 'top' AND e.rank = 0 AND list_contains(?, e.feature)"""
        return {row["feature"]: self._example(row) for row in self._rows(sql, [list(features)])}

    def explanation_inputs(self) -> dict:
        """Everything explanation needs, as numpy arrays: example rows (sorted by feature), contexts, negatives.

        Keys: ``rows`` (dict of per-row arrays plus flattened window offsets/values), ``context_ids``,
        ``tokens_CT``, ``pool`` (context, position per slot), ``firing`` (slot, feature),
        ``hard`` (feature, context, position).
        """
        if int(self.metadata["index"].get("format_version", 1)) < 2:
            raise FeatureIndexError(
                f"{self.path} predates explanations (it keeps no negative examples): rebuild it with `saescope index`"
            )
        with self._lock:
            examples = self.con.sql(
                """SELECT feature, kind = 'top' AS is_top, rank, bin, context, position, window_start,
                          len(coalesce(window_offsets, [])) AS n, coalesce(window_offsets, []) AS offsets,
                          coalesce(window_values, []) AS vals
                   FROM examples ORDER BY feature, kind, bin, rank"""
            ).to_arrow_table()
            contexts = self.con.sql("SELECT context, tokens FROM contexts ORDER BY context").to_arrow_table()
            pool = self.con.execute("SELECT context, position FROM negative_pool ORDER BY slot").fetchnumpy()
            firing = self.con.execute("SELECT slot, feature FROM pool_firing").fetchnumpy()
            hard = self.con.execute(
                "SELECT feature, context, position FROM hard_negatives ORDER BY feature, neighbour, context, position"
            ).fetchnumpy()
        column = lambda name: examples[name].to_numpy()  # noqa: E731
        rows = {
            "feature_R": column("feature"),
            "is_top_R": examples["is_top"].to_numpy(zero_copy_only=False),
            "rank_R": column("rank"),
            "bin_R": column("bin"),
            "context_R": column("context"),
            "position_R": column("position"),
            "window_start_R": column("window_start"),
            "window_lengths_R": column("n"),
            "window_offsets": pc.list_flatten(examples["offsets"]).to_numpy(),
            "window_values": pc.list_flatten(examples["vals"]).to_numpy(),
        }
        tokens = contexts["tokens"].to_numpy(zero_copy_only=False)
        return {
            "rows": rows,
            "context_ids": contexts["context"].to_numpy(),
            "tokens_CT": np.stack(tokens).astype(np.int32) if len(tokens) else np.zeros((0, self.ctx_len), np.int32),
            "pool": pool,
            "firing": firing,
            "hard": hard,
        }

    def overview(self) -> dict:
        """Run metadata plus counts over all features and the log-density histogram."""
        counts = self._rows(
            "SELECT count(*) AS n_features, count(*) FILTER (WHERE dead) AS n_dead, "
            "median(density) FILTER (WHERE NOT dead) AS median_density FROM features",
            [],
        )[0]
        hist = self._rows("SELECT * FROM density_histogram ORDER BY bin_low", [])
        return {**self.metadata, **counts, "density_histogram": hist}


def open_transcoder_index(set_folder: Path, layer: int) -> FeatureIndex:
    """The feature index of one layer of a transcoder set (``saescope index --transcoders``), checked against
    the layer's weights now; FeatureIndexError when there is none or it is stale."""
    return open_sae_index(layer_dir(set_folder, layer))


def open_sae_index(sae_folder: Path) -> FeatureIndex:
    """The feature index of an SAE folder, checked to belong to the weights it holds now."""
    return FeatureIndex.for_sae(sae_folder, weights_fingerprint(sae_folder))
