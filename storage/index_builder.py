"""Build the DuckDB feature index of an SAE: streaming inserts, exact SQL binning, atomic publish.

The builder receives, batch by batch, every non-zero activation as a row
(feature, context, position, value) and spills them into a scratch DuckDB file
(bounded memory: DuckDB sorts and groups out of core). At ``finish`` SQL computes,
per feature, exactly:
  * equal-width bins over [0, max] and equal-count (quantile) bins, with the
    number of activations in each and a few examples drawn uniformly (by a
    fixed hash of the token, so rebuilds are reproducible);
  * a histogram of the non-zero activations;
  * the activations of the feature in a window around each example's position.
Everything else (statistics, top examples, logit effects, neighbours) is computed
by the caller and passed in. The index is written to ``features.duckdb.tmp-<pid>``
and renamed over ``features.duckdb`` only when complete, so a killed build leaves
the previous index untouched and readers holding it open keep working.

Tables (one row per feature unless noted; all sorted by feature):
  metadata(key, value)                  JSON values: model, layer, SAE, metrics, build
  features(feature, n_active, density, log10_density, max_act, mean_act, dead[, dense])
                                        dense: only in transcoder indexes (density above the threshold in
                                        the metadata's "dense" entry)
  histograms(feature, bin_width, counts)
  interval_bins(feature, kind, bin, lower, upper, n_activations)     kind: width | quantile
  examples(feature, kind, bin, rank, context, position, activation, token_id,
           window_start, window_offsets, window_values)              kind: top | width | quantile
  contexts(context, tokens)             token ids of every indexed context
  vocab(token_id, text)                 decoded token strings
  logit_effects(feature, promoted_ids, promoted_values, suppressed_ids, suppressed_values)   raw W_dec.W_U
  logit_effects_std(feature, promoted_ids, promoted_z, promoted_raw, suppressed_...)   standardized per token
  neighbours(feature, neighbour_ids, cosines)
  density_histogram(bin_low, bin_high, n_features)    log10 density over live features
  token_features(token_id, feature, source, hits)     search: top-example peak tokens and promoted tokens
  negative_pool(slot, context, position)     random windows (hash-chosen), shared by every feature
  pool_firing(slot, feature)                   features with a non-zero activation within +-window of a pool window
  hard_negatives(feature, neighbour, context, position)   examples of a feature's nearest features (by decoder)
                                               on whose +-window the feature itself is zero
The last three are the negatives that explanation scoring needs (format version 2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from storage.constants import FEATURE_INDEX

INDEX_FORMAT_VERSION = 2
NEGATIVE_POOL = 1024
HARD_NEGATIVES = 32
HARD_NEGATIVE_NEIGHBOURS = 4


def index_path(sae_folder: Path) -> Path:
    return Path(sae_folder) / FEATURE_INDEX


def _np(array) -> np.ndarray:
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


class IndexBuilder:
    """Writes one feature index; see the module docstring. Use as a context manager."""

    def __init__(self, sae_folder: Path, memory_limit: str = "1GB", threads: int | None = None):
        self.final = index_path(sae_folder)
        self.tmp = self.final.with_name(f"{self.final.name}.tmp-{os.getpid()}")
        self.scratch_dir = self.final.with_name(f".index-scratch-{os.getpid()}")
        remove_stale_builds(Path(sae_folder))
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.tmp))
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET temp_directory = '{self.scratch_dir}'")
        self.con.execute("SET preserve_insertion_order = false")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.con.execute(f"ATTACH '{self.scratch_dir / 'codes.duckdb'}' AS scratch")
        self.con.execute(
            "CREATE TABLE scratch.codes (feature INTEGER, context INTEGER, position SMALLINT, value FLOAT)"
        )
        self.con.execute("CREATE TABLE scratch.contexts (context INTEGER, tokens INTEGER[])")
        self.published = False

    def __enter__(self) -> IndexBuilder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run_with(self, columns: dict, sql: str) -> None:
        """Execute ``sql`` with the columns available as the relation ``rows``."""
        self.con.register("rows", pa.table(columns))
        try:
            self.con.execute(sql)
        finally:
            self.con.unregister("rows")

    def add_codes(self, feature, context, position, value) -> None:
        """Append non-zero activations (flat arrays of equal length)."""
        columns = {
            "feature": _np(feature).astype(np.int32),
            "context": _np(context).astype(np.int32),
            "position": _np(position).astype(np.int16),
            "value": _np(value).astype(np.float32),
        }
        self._run_with(columns, "INSERT INTO scratch.codes SELECT * FROM rows")

    def add_contexts(self, context_ids, tokens_CT) -> None:
        """Record the token ids of indexed contexts."""
        ids, tokens = _np(context_ids).astype(np.int32), _np(tokens_CT).astype(np.int32)
        columns = {"context": ids, "tokens": pa.array(list(tokens), type=pa.list_(pa.int32()))}
        self._run_with(columns, "INSERT INTO scratch.contexts SELECT * FROM rows")

    def _insert(self, name: str, columns: dict) -> None:
        self._run_with(columns, f"CREATE TABLE {name} AS SELECT * FROM rows ORDER BY feature")

    def set_memory_limit(self, memory_limit: str) -> None:
        """Change DuckDB's memory limit (several builders share one process while they stream)."""
        self.con.execute(f"SET memory_limit = '{memory_limit}'")

    def write_features(self, n_active, density, max_act, mean_act, dense_threshold: float | None = None) -> None:
        """Per-feature statistics; with ``dense_threshold`` also a ``dense`` column (density above it)."""
        n_active, density = _np(n_active).astype(np.int64), _np(density).astype(np.float64)
        with np.errstate(divide="ignore"):
            log_density = np.where(n_active > 0, np.log10(np.maximum(density, 1e-300)), np.nan)
        columns = {
            "feature": np.arange(len(n_active), dtype=np.int32),
            "n_active": n_active,
            "density": density,
            "log10_density": log_density,
            "max_act": _np(max_act).astype(np.float32),
            "mean_act": _np(mean_act).astype(np.float32),
            "dead": n_active == 0,
        }
        if dense_threshold is not None:
            columns["dense"] = density > dense_threshold
        self._insert("features", columns)
        live = log_density[np.isfinite(log_density)]
        edges = np.linspace(np.floor(live.min()), 0.0, 41) if live.size else np.linspace(-8, 0, 41)
        counts, _ = np.histogram(live, bins=edges)
        columns = {"bin_low": edges[:-1], "bin_high": edges[1:], "n_features": counts.astype(np.int64)}
        self._run_with(columns, "CREATE TABLE density_histogram AS SELECT * FROM rows")

    def write_top_examples(self, values_FK, contexts_FK, positions_FK) -> None:
        values, contexts, positions = _np(values_FK), _np(contexts_FK), _np(positions_FK)
        n_features, k = values.shape
        feature = np.repeat(np.arange(n_features, dtype=np.int32), k)
        rank = np.tile(np.arange(k, dtype=np.int16), n_features)
        keep = contexts.reshape(-1) >= 0
        columns = {
            "feature": feature[keep],
            "kind": np.full(keep.sum(), "top"),
            "bin": np.zeros(keep.sum(), np.int16),
            "rank": rank[keep],
            "context": contexts.reshape(-1)[keep].astype(np.int32),
            "position": positions.reshape(-1)[keep].astype(np.int16),
            "activation": values.reshape(-1)[keep].astype(np.float32),
        }
        self._run_with(columns, "CREATE TABLE scratch.examples AS SELECT * FROM rows")

    def write_logit_effects(self, up_values, up_ids, down_values, down_ids) -> None:
        up_values, up_ids = _np(up_values).astype(np.float32), _np(up_ids).astype(np.int32)
        down_values, down_ids = _np(down_values).astype(np.float32), _np(down_ids).astype(np.int32)
        lists = lambda a: pa.array(list(a))  # noqa: E731
        self._insert(
            "logit_effects",
            {
                "feature": np.arange(len(up_ids), dtype=np.int32),
                "promoted_ids": lists(up_ids),
                "promoted_values": lists(up_values),
                "suppressed_ids": lists(down_ids),
                "suppressed_values": lists(down_values),
            },
        )

    def write_standardized_effects(self, effects: dict) -> None:
        """Tokens ranked by effect standardized over features (ids, z-scores, raw effects), per feature."""
        arrays = {name: _np(value) for name, value in effects.items()}
        columns = {"feature": np.arange(len(arrays["promoted_ids"]), dtype=np.int32)}
        for name, array in sorted(arrays.items()):
            columns[name] = pa.array(list(array.astype(np.int32 if name.endswith("_ids") else np.float32)))
        self._insert("logit_effects_std", columns)

    def write_neighbours(self, cosines, ids) -> None:
        cosines, ids = _np(cosines).astype(np.float32), _np(ids).astype(np.int32)
        self._insert(
            "neighbours",
            {
                "feature": np.arange(len(ids), dtype=np.int32),
                "neighbour_ids": pa.array(list(ids)),
                "cosines": pa.array(list(cosines)),
            },
        )

    def write_vocab(self, texts: list[str]) -> None:
        columns = {"token_id": np.arange(len(texts), dtype=np.int32), "text": texts}
        self._run_with(columns, "CREATE TABLE vocab AS SELECT * FROM rows ORDER BY token_id")

    def write_metadata(self, metadata: dict) -> None:
        columns = {"key": list(metadata), "value": [json.dumps(v) for v in metadata.values()]}
        self._run_with(columns, "CREATE TABLE metadata AS SELECT * FROM rows")

    def finish(
        self,
        ctx_len: int,
        window: int,
        width_bins: int = 8,
        quantile_bins: int = 8,
        samples_per_bin: int = 8,
        histogram_bins: int = 32,
    ) -> Path:
        """Run the SQL steps, write the remaining tables, and publish the index atomically."""
        sql = _finishing_sql(ctx_len, window, width_bins, quantile_bins, samples_per_bin, histogram_bins)
        for statement in sql:
            self.con.execute(statement)
        self.con.execute("DETACH scratch")
        self.con.execute("CHECKPOINT")
        self.con.close()
        os.replace(self.tmp, self.final)
        self.published = True
        self._cleanup()
        return self.final

    def close(self) -> None:
        """Abandon an unfinished build (the published index, if any, is untouched)."""
        if not self.published:
            try:
                self.con.close()
            except duckdb.Error:
                pass
            self.tmp.unlink(missing_ok=True)
            Path(f"{self.tmp}.wal").unlink(missing_ok=True)
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.scratch_dir, ignore_errors=True)


def remove_stale_builds(sae_folder: Path) -> None:
    """Delete temp files of builds whose process is gone (killed jobs)."""
    for stale in list(Path(sae_folder).glob(f"{FEATURE_INDEX}.tmp-*")) + list(
        Path(sae_folder).glob(".index-scratch-*")
    ):
        pid = stale.name.rsplit("-", 1)[-1].split(".")[0]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finishing_sql(ctx_len, window, width_bins, quantile_bins, samples_per_bin, histogram_bins) -> list[str]:
    sample_order = "hash(c.context * 8191 + c.position)"
    return [
        # Equal-width bins over [0, max]: counts and a hash-random sample per bin.
        f"""CREATE TABLE scratch.width AS
            SELECT c.feature, c.context, c.position, c.value,
                   LEAST(CAST(FLOOR(c.value / f.max_act * {width_bins}) AS INTEGER), {width_bins - 1}) AS bin
            FROM scratch.codes c JOIN features f USING (feature)""",
        # Equal-count bins: ntile over the values in order, so counts differ by at most one.
        f"""CREATE TABLE scratch.quantile AS
            SELECT feature, context, position, value,
                   CAST(ntile({quantile_bins}) OVER (PARTITION BY feature ORDER BY value, context, position) - 1
                        AS INTEGER) AS bin
            FROM scratch.codes""",
        f"""CREATE TABLE interval_bins AS
            SELECT feature, 'width' AS kind, CAST(b.bin AS SMALLINT) AS bin,
                   CAST(f.max_act * b.bin / {width_bins} AS FLOAT) AS lower,
                   CAST(f.max_act * (b.bin + 1) / {width_bins} AS FLOAT) AS upper,
                   COALESCE(n, 0) AS n_activations
            FROM features f CROSS JOIN range({width_bins}) AS b(bin)
            LEFT JOIN (SELECT feature, bin, count(*) AS n FROM scratch.width GROUP BY ALL) w USING (feature, bin)
            WHERE NOT f.dead
            UNION ALL
            SELECT feature, 'quantile', CAST(bin AS SMALLINT), min(value), max(value), count(*)
            FROM scratch.quantile GROUP BY feature, bin
            ORDER BY feature, kind, bin""",
        f"""INSERT INTO scratch.examples
            SELECT feature, kind, CAST(bin AS SMALLINT), CAST(rank - 1 AS SMALLINT), context, position, value
            FROM (
              SELECT 'width' AS kind, c.*, row_number() OVER (PARTITION BY feature, bin ORDER BY {sample_order}) AS rank
              FROM scratch.width c
              UNION ALL
              SELECT 'quantile' AS kind, c.*, row_number() OVER (PARTITION BY feature, bin ORDER BY {sample_order})
              FROM scratch.quantile c
            ) WHERE rank <= {samples_per_bin}""",
        f"""CREATE TABLE histograms AS
            SELECT f.feature, CAST(f.max_act / {histogram_bins} AS FLOAT) AS bin_width,
                   list(COALESCE(h.n, 0) ORDER BY b.bin) AS counts
            FROM features f CROSS JOIN range({histogram_bins}) AS b(bin)
            LEFT JOIN (SELECT c.feature,
                              LEAST(CAST(FLOOR(c.value / f.max_act * {histogram_bins}) AS INTEGER),
                                    {histogram_bins - 1}) AS bin,
                              count(*) AS n
                       FROM scratch.codes c JOIN features f USING (feature) GROUP BY ALL) h
                 ON h.feature = f.feature AND h.bin = b.bin
            WHERE NOT f.dead
            GROUP BY f.feature, f.max_act ORDER BY f.feature""",
        # Activations of the feature around each example (sparse: offsets from window_start, values).
        f"""CREATE TABLE examples AS
            SELECT e.feature, e.kind, e.bin, e.rank, e.context, e.position, e.activation,
                   ctx.tokens[e.position + 1] AS token_id,
                   CAST(GREATEST(0, e.position - {window}) AS SMALLINT) AS window_start,
                   list(CAST(c.position - GREATEST(0, e.position - {window}) AS SMALLINT) ORDER BY c.position)
                       FILTER (WHERE c.position IS NOT NULL) AS window_offsets,
                   list(c.value ORDER BY c.position) FILTER (WHERE c.position IS NOT NULL) AS window_values
            FROM scratch.examples e
            JOIN scratch.contexts ctx ON ctx.context = e.context
            LEFT JOIN scratch.codes c ON c.feature = e.feature AND c.context = e.context
                 AND c.position BETWEEN e.position - {window} AND e.position + {window}
            GROUP BY ALL
            ORDER BY e.feature, e.kind, e.bin, e.rank""",
        """CREATE TABLE contexts AS SELECT * FROM scratch.contexts ORDER BY context""",
        *_negatives_sql(ctx_len, window),
        # Token -> features lookup for search: peak tokens of top examples, and top promoted tokens.
        """CREATE TABLE token_features AS
            SELECT token_id, feature, 'example' AS source, count(*) AS hits FROM examples
            WHERE kind = 'top' GROUP BY ALL
            UNION ALL
            SELECT unnest(promoted_ids) AS token_id, feature, 'logit' AS source, 1 AS hits FROM logit_effects
            ORDER BY token_id, feature""",
        f"""INSERT INTO metadata VALUES ('index', '{
            json.dumps(
                {
                    "format_version": INDEX_FORMAT_VERSION,
                    "ctx_len": ctx_len,
                    "window": window,
                    "width_bins": width_bins,
                    "quantile_bins": quantile_bins,
                    "samples_per_bin": samples_per_bin,
                    "histogram_bins": histogram_bins,
                }
            )
        }')""",
    ]


def _negatives_sql(ctx_len: int, window: int) -> list[str]:
    """Random pool windows and per-feature hard negatives (see the module docstring)."""
    return [
        f"""CREATE TABLE negative_pool AS
            SELECT CAST(row_number() OVER (ORDER BY h, context, position) - 1 AS INTEGER) AS slot, context,
                   CAST(position AS SMALLINT) AS position
            FROM (SELECT context, p AS position, hash(context * 8191 + p + 17) AS h
                  FROM scratch.contexts, range(1, {ctx_len}) AS t(p)
                  ORDER BY h, context, position LIMIT {NEGATIVE_POOL})
            ORDER BY slot""",
        f"""CREATE TABLE pool_firing AS
            SELECT DISTINCT n.slot, c.feature FROM negative_pool n JOIN scratch.codes c
              ON c.context = n.context AND c.position BETWEEN n.position - {window} AND n.position + {window}
            ORDER BY n.slot, c.feature""",
        f"""CREATE TABLE hard_negatives AS
            WITH candidates AS (
              SELECT DISTINCT ON (n.feature, e.context, e.position) n.feature, n.neighbour, e.context, e.position
              FROM (SELECT feature, unnest(neighbour_ids[1:{HARD_NEGATIVE_NEIGHBOURS}]) AS neighbour
                    FROM neighbours) n
              JOIN scratch.examples e ON e.feature = n.neighbour
              ORDER BY n.feature, e.context, e.position, n.neighbour),
            firing AS (
              SELECT DISTINCT k.feature, k.context, k.position FROM candidates k JOIN scratch.codes c
                ON c.feature = k.feature AND c.context = k.context
               AND c.position BETWEEN k.position - {window} AND k.position + {window})
            SELECT feature, neighbour, context, position FROM (
              SELECT k.*, row_number() OVER (PARTITION BY k.feature
                                             ORDER BY hash(k.context * 8191 + k.position + k.feature),
                                                      k.context, k.position) AS r
              FROM candidates k ANTI JOIN firing f USING (feature, context, position))
            WHERE r <= {HARD_NEGATIVES}
            ORDER BY feature, neighbour, context, position""",
    ]
