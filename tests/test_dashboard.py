"""The dashboard's pages under Streamlit's AppTest on the tiny indexed run, and its rendering helpers."""

from __future__ import annotations

import html

import pytest
from streamlit.testing.v1 import AppTest

from dashboards.render import bin_edges, histogram_rows, shade_alpha, shade_tokens, visible_token


def page(name: str, run, **query) -> AppTest:
    app = AppTest.from_string(f"from dashboards.views import {name}\n{name}.render()\n", default_timeout=120)
    for key, value in query.items():
        app.query_params[key] = str(value)
    return app


@pytest.fixture(scope="module", autouse=True)
def _release_shared_resources():
    """Drop the app's cached DuckDB connections and models before the interpreter exits."""
    yield
    import gc

    import streamlit as st

    st.cache_resource.clear()
    gc.collect()


@pytest.fixture
def served(indexed_run, monkeypatch):
    run, _ = indexed_run
    monkeypatch.setenv("SAESCOPE_RUN", str(run))
    return run


def html_of(app: AppTest) -> str:
    """Every raw-HTML block (st.html) and markdown block of the page, concatenated."""
    return "".join(h.proto.body for h in app.get("html")) + "".join(str(m.value) for m in app.markdown)


def text_of(app: AppTest) -> str:
    parts = [m.value for m in app.markdown] + [e.value for e in app.error] + [t.value for t in app.title]
    parts += [c.value for c in app.caption] + [h.value for h in app.subheader]
    return "\n".join(str(p) for p in parts)


def test_overview_shows_metrics_and_feature_counts(served):
    app = page("overview", served).run()
    assert not app.exception
    labels = {m.label for m in app.metric}
    assert {"FVU", "explained variance", "L0"} <= labels
    assert "64 features" in text_of(app) and "live" in text_of(app)


def test_features_table_lists_links(served):
    app = page("features", served).run()
    assert not app.exception
    frame = app.dataframe[0].value
    assert len(frame) > 0 and frame["feature"].str.startswith("./feature?id=").all()


@pytest.mark.parametrize("feature", [0, 63])
def test_feature_page_first_and_last(served, feature):
    app = page("feature", served, id=feature).run()
    assert not app.exception
    assert app.title[0].value.startswith(f"Feature {feature}")
    body = text_of(app)
    assert "Top examples" in body and "Nearest features" in body


@pytest.mark.parametrize(("bad", "message"), [("64", "out of range"), ("abc", "is not a number"), ("", "no feature")])
def test_feature_page_bad_ids_are_messages(served, bad, message):
    app = page("feature", served, id=bad).run()
    assert not app.exception
    assert message in app.error[0].value


def test_top_examples_are_shaded_spans(served, indexed_run):
    from storage.feature_queries import FeatureIndex

    with FeatureIndex(indexed_run[1]) as index:
        live = index.list_features("max", limit=1)[0]["feature"]
    app = page("feature", served, id=live).run()
    markup = html_of(app)
    assert markup.count('class="tok"') > 20
    assert "background: rgba(255,136,0,1.000)" in markup  # the peak of the top example


def test_probe_shows_per_token_rows(served):
    app = page("probe", served).run()
    app.text_area[0].input("The cat sat on the mat.")
    app.button[0].click().run()
    assert not app.exception
    rows = app.dataframe[0].value
    assert len(rows) == 1 + len("The cat sat on the mat.")  # BOS + one token per character
    assert app.selectbox, "a feature to shade by"


def test_probe_empty_text_is_a_message(served):
    app = page("probe", served).run()
    app.button[0].click().run()
    assert not app.exception and "type some text" in app.warning[0].value


def test_steering_submit_shows_two_texts(served):
    app = page("steer", served, feature=3).run()
    assert app.text_input[0].value == "3"
    app.text_input[1].input("4")
    app.number_input[3].set_value(6)  # max new tokens
    app.button(key="generate").click().run()
    assert not app.exception, app.exception
    headers = [h.value for h in app.subheader]
    assert headers[0] == "default" and headers[1].startswith("steered: #3 clamp 4")
    assert "mean KL" in text_of(app)


def test_steering_sweep_table(served):
    app = page("steer", served, feature=3).run()
    app.number_input[3].set_value(4)
    app.text_input[2].input("0,2,4")
    app.button[0].click().run()
    assert not app.exception
    assert list(app.dataframe[0].value["value"]) == ["0", "2", "4"]


@pytest.mark.parametrize(("features", "value", "message"), [("999", "8x", "out of range"), ("3", "lots", "bad value")])
def test_steering_bad_input_is_a_message(served, features, value, message):
    app = page("steer", served).run()
    app.text_input[0].input(features)
    app.text_input[1].input(value)
    app.button[0].click().run()
    assert not app.exception and message in app.error[0].value


def test_run_without_index_says_which_command_builds_it(served, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(served, copy)
    (copy / "saes" / "default" / "features.duckdb").unlink()
    monkeypatch.setenv("SAESCOPE_RUN", str(copy))
    app = page("features", copy).run()
    assert not app.exception and "saescope index" in app.error[0].value


def test_replaced_index_is_used_on_the_next_load(served, tmp_path, monkeypatch):
    import shutil

    from jobs.index_job import IndexConfig, run_index

    copy = tmp_path / "run"
    shutil.copytree(served, copy)
    monkeypatch.setenv("SAESCOPE_RUN", str(copy))
    before = page("feature", copy, id=5).run()
    assert "Top examples" in text_of(before)
    run_index(IndexConfig(run=str(copy), device="cpu", top_k=5, window=1))
    after = page("feature", copy, id=5).run()
    assert not after.exception
    n_tokens = lambda app: html_of(app).count('class="tok"')  # noqa: E731
    assert n_tokens(after) < n_tokens(before) / 2  # windows of 1 token each side instead of 4


def test_tokens_are_escaped_before_shading():
    markup = shade_tokens(["<script>alert(1)</script>", '<img src=x onerror="a()">', "ok"], [1.0, 0.5, 0.0], 1.0)
    assert "<script>" not in markup and "<img" not in markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup and "onerror=&quot;a()&quot;" in markup
    assert visible_token("a\nb") == "a↵b"


def test_shading_scale():
    assert shade_alpha(2.0, 4.0) == 0.5 and shade_alpha(8.0, 4.0) == 1.0
    assert shade_alpha(-1.0, 4.0) == 0.0 and shade_alpha(float("nan"), 4.0) == 0.0 and shade_alpha(1.0, 0.0) == 0.0
    markup = shade_tokens(["a", "b"], [0.25, 1.0], 1.0, peak=1, titles=["x", "y"])
    assert "rgba(255,136,0,0.250)" in markup and "outline" in markup.split("</span>")[1]
    assert 'title="x"' in markup


def test_bin_edges_and_histogram_rows():
    bins = [{"lower": 0.5, "upper": 1.0}, {"lower": 0.0, "upper": 0.5}, {"lower": 1.0, "upper": 2.0}]
    assert bin_edges(bins) == [0.0, 0.5, 1.0, 2.0]
    assert histogram_rows([3, 0, 1], 0.5) == [
        {"low": 0.0, "high": 0.5, "count": 3},
        {"low": 0.5, "high": 1.0, "count": 0},
        {"low": 1.0, "high": 1.5, "count": 1},
    ]


@pytest.fixture(scope="module")
def explained_run(indexed_run, tmp_path_factory):
    """A copy of the tiny indexed run with token explanations of every live feature."""
    import shutil

    from jobs.explain_job import ExplainConfig, run_explain

    run = tmp_path_factory.mktemp("explained") / "run"
    shutil.copytree(indexed_run[0], run)
    run_explain(ExplainConfig(run=str(run), test_examples=6, embed_examples=3))
    return run


def test_search_by_meaning_ranks_and_shows_explanations(explained_run, monkeypatch):
    monkeypatch.setenv("SAESCOPE_RUN", str(explained_run))
    app = page("features", explained_run).run()
    assert not app.exception
    assert {"explanation", "AUROC", "control"} <= set(app.dataframe[0].value.columns)
    app.text_input(key="meaning").input("words").run()
    assert not app.exception
    frame = app.dataframe[0].value
    assert len(frame) > 0 and list(frame["similarity"]) == sorted(frame["similarity"], reverse=True)
    assert "closest in meaning to 'words'" in text_of(app)


def test_feature_page_shows_explanation_and_scores_beside_controls(explained_run, monkeypatch):
    from storage.explanations import ExplanationReader, explanations_path

    monkeypatch.setenv("SAESCOPE_RUN", str(explained_run))
    with ExplanationReader(explanations_path(explained_run / "saes" / "default")) as reader:
        feature, label = next(iter(reader.labels(list(range(64))).items()))
    app = page("feature", explained_run, id=feature).run()
    assert not app.exception
    assert f"<b>Explanation</b> (tokens): {html.escape(label['text'])}</div>" in html_of(app)
    assert all(label["text"] not in str(m.value) for m in app.markdown)  # a label is text, never markdown
    scores = app.dataframe[0].value
    assert set(scores["scorer"]) == {"simulation", "embedding"}
    assert "control (another feature's label)" in scores.columns


def test_meaning_search_is_disabled_before_explain(served):
    app = page("features", served).run()
    assert not app.exception and app.text_input(key="meaning").disabled
