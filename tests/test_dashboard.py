"""The dashboard's pages under Streamlit's AppTest on the tiny indexed run, and its rendering helpers."""

from __future__ import annotations

import html
from html.parser import HTMLParser

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
    from storage.index_queries import FeatureIndex

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

    from jobs.index import IndexConfig, run_index

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

    from jobs.explain import ExplainConfig, run_explain

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


def first_labelled(run) -> tuple[int, dict]:
    """(feature, its label row) of the first feature of the tiny run that `explain` labelled."""
    from storage.explanations import ExplanationReader, explanations_path

    with ExplanationReader(explanations_path(run / "saes" / "default")) as reader:
        return next(iter(reader.labels(list(range(64))).items()))


def test_feature_page_shows_explanation_and_scores_beside_controls(explained_run, monkeypatch):
    monkeypatch.setenv("SAESCOPE_RUN", str(explained_run))
    feature, label = first_labelled(explained_run)
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


class _VisibleText(HTMLParser):
    """The text a browser shows for markup: character data outside <style>, entities decoded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self._in_style = [], False

    def handle_starttag(self, tag, attrs):
        self._in_style = self._in_style or tag == "style"

    def handle_endtag(self, tag):
        self._in_style = self._in_style and tag != "style"

    def handle_data(self, data):
        if not self._in_style:
            self.parts.append(data)


def visible_text(markup: str) -> str:
    parser = _VisibleText()
    parser.feed(markup)
    return "".join(parser.parts)


def html_blocks(app: AppTest, marker: str) -> list[str]:
    return [h.proto.body for h in app.get("html") if marker in h.proto.body]


TRICKY = 'Use `x` and *y* with $a+b$ and _b_ <script>alert(1)</script>\n```py\nx = 1\n```\n    indented "q" & \\'


def probed(run, text: str) -> AppTest:
    app = page("probe", run).run()
    app.text_area[0].input(text)
    app.button[0].click().run()
    assert not app.exception, app.exception
    return app


def test_probe_renders_markdown_and_markup_characters_as_text(served):
    app = probed(served, TRICKY)
    (shaded,) = html_blocks(app, 'class="tokens"')
    assert visible_text(shaded) == "<bos>" + TRICKY  # the text exactly as typed, after the BOS position
    assert "<script>" not in shaded and "<span" not in visible_text(shaded)
    assert all("a+b" not in str(m.value) for m in app.markdown)  # never through markdown (no $…$ math)
    tokens = list(app.dataframe[0].value["token"])
    assert tokens[1:4] == ["U", "s", "e"] and "↵" in tokens and "·" in tokens  # whitespace tokens stay visible


def test_probe_leaves_special_positions_out_by_default(served):
    app = probed(served, "The cat sat.")
    rows = app.dataframe[0].value
    assert rows["token"][0] == "<bos>  (special)" and rows["top features"][0] == ""
    (shaded,) = html_blocks(app, 'class="tokens"')
    bos_span = shaded.split("</span>")[0]
    assert "(special position)" in bos_span and 'data-act="0"' in bos_span  # the BOS token is not shaded
    result = app.session_state["probe_result"][2]
    app.toggle[0].set_value(True).run()
    assert not app.exception
    if float(result.feats_TF[0].max()) > 0:
        assert app.dataframe[0].value["top features"][0] != ""


def test_probe_result_ranks_without_special_positions():
    import torch

    from pipeline.features.probe import ProbeResult

    feats_TF = torch.tensor([[100.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 3.0]])
    result = ProbeResult([1, 5, 6], feats_TF, (True, False, False))
    assert result.strongest(5) == [(2, 3.0), (1, 2.0)]
    assert result.strongest(5, include_special=True)[0] == (0, 100.0)
    assert result.activations_of(0, include_special=False) == [0.0, 0.0, 0.0]
    assert result.activations_of(0) == [100.0, 0.0, 0.0]


def test_probe_shows_labels_beside_and_on_hover(explained_run, monkeypatch):
    from storage.explanations import ExplanationReader, explanations_path

    monkeypatch.setenv("SAESCOPE_RUN", str(explained_run))
    app = probed(explained_run, "The cat sat on the mat.")
    result = app.session_state["probe_result"][2]
    with ExplanationReader(explanations_path(explained_run / "saes" / "default")) as reader:
        labels = reader.labels([f for f, _ in result.strongest(30)])
    assert labels, "the tiny run's strongest features have labels"
    feature, row = next(iter(labels.items()))
    (links,) = html_blocks(app, 'class="feature-links"')
    assert f'title="{html.escape(row["text"], quote=True)}">#{feature} ' in links
    cells = " ".join(app.dataframe[0].value["top features"])
    assert any(label["text"][:20] in cells for label in labels.values())
    assert any(row["text"][:20] in option for option in app.selectbox[0].options)


def generations(app: AppTest) -> list[tuple[str, list[int], str]]:
    """(role, token ids, visible text) of every generation the steering page shows."""
    found = []
    for block in html_blocks(app, 'class="generation"'):
        for part in block.split('<div class="generation"')[1:]:
            role = part.split('data-role="')[1].split('"')[0]
            ids = [int(t) for t in part.split('data-ids="')[1].split('"')[0].split(",") if t]
            found.append((role, ids, visible_text('<div class="generation"' + part)))
    return found


@pytest.mark.parametrize("button", ["generate", "sweep"])
def test_steering_generations_are_text_not_markup(served, tokenizer, button):
    app = page("steer", served, feature=3).run()
    app.number_input[3].set_value(8)
    app.text_input[2].input("0, 2xmean")
    app.text_area[0].input("*a* `b` $c$ <i>")
    app.button(key=button).click().run()
    assert not app.exception, app.exception
    shown = generations(app)
    assert len(shown) == (2 if button == "generate" else 3)
    for role, ids, text in shown:
        assert ids, role
        assert text == tokenizer.decode(ids), role
        assert "<span" not in text and 'class="tok"' not in text and "data-act" not in text
    assert all('class="tok"' not in str(m.value) for m in app.markdown)


def test_steering_header_shows_label_density_and_max(explained_run, monkeypatch):
    monkeypatch.setenv("SAESCOPE_RUN", str(explained_run))
    feature, row = first_labelled(explained_run)
    app = page("steer", explained_run, feature=feature).run()
    assert not app.exception
    (header,) = html_blocks(app, "mean when active")
    assert html.escape(row["text"]) in header and "density" in header and "max" in header


def test_retrained_sae_is_used_on_the_next_probe(indexed_copy, monkeypatch):
    from conftest import tiny_train_config

    from jobs.train import run_train
    from storage.sae_store import weights_fingerprint

    monkeypatch.setenv("SAESCOPE_RUN", str(indexed_copy))
    folder = indexed_copy / "saes" / "default"
    before = probed(indexed_copy, "The cat sat.").session_state["probe_result"][2].feats_TF
    sha = weights_fingerprint(folder)
    run_train(tiny_train_config(indexed_copy, tokens=256 * 8, seed=7, force=True, checkpoint_every=None))
    assert weights_fingerprint(folder) != sha
    after = probed(indexed_copy, "The cat sat.").session_state["probe_result"][2].feats_TF
    assert after.shape == before.shape and not torch_equal(after, before)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_replaced_index_handle_keeps_answering(served, tmp_path, monkeypatch):
    import shutil

    from dashboards.resources import feature_index
    from jobs.index import IndexConfig, run_index

    copy = tmp_path / "run"
    shutil.copytree(served, copy)
    folder = copy / "saes" / "default"
    old = feature_index(folder)
    run_index(IndexConfig(run=str(copy), device="cpu", top_k=5, window=1))
    new = feature_index(folder)
    assert new is not old and not old.closed
    assert old.window == 4 and new.window == 1  # each reads the file it opened
    assert old.summary(5)["feature"] == 5 and len(new.top_examples(5)[0].tokens) <= 3


def byte_level_tokenizer():
    """A byte-level BPE tokenizer trained in code on ASCII text: any other character is byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>"]
    )
    core.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>")


def test_byte_tokens_show_their_bytes_and_merge_on_hover():
    from dashboards.render import token_spans
    from pipeline.lm.token_text import display_text, merged_texts, vocab_bytes

    tok = byte_level_tokenizer()
    ids = tok("a—b 中", add_special_tokens=False).input_ids
    texts = [tok.decode([i]) for i in ids]
    raw = vocab_bytes(tok, ids)
    shown = [display_text(t, r) for t, r in zip(texts, raw, strict=True)]
    assert shown == ["a", "\\xe2", "\\x80", "\\x94", "b", "·", "\\xe4", "\\xb8", "\\xad"]
    assert len(set(shown)) == len(shown) and "\ufffd" not in "".join(shown)
    assert "".join(merged_texts(texts, raw)) == tok.decode(ids) == "a—b 中"
    markup = token_spans(texts, [0.0] * len(ids), 1.0, raw=raw, line_breaks=True)
    assert visible_text(markup) == "a—b 中"  # the text is whole; the bytes are drawn beside it by CSS
    assert 'data-show="\\xe2"' in markup and "text here: &#x27;—&#x27;" in markup
    assert vocab_bytes(tok, [tok.bos_token_id]) == [None]


def test_a_graph_names_byte_tokens_by_their_bytes():
    from pipeline.lm.token_text import token_text

    tok = byte_level_tokenizer()
    ids = tok("a—b", add_special_tokens=False).input_ids
    assert [token_text(tok, i) for i in ids] == ["a", "\\xe2", "\\x80", "\\x94", "b"]
    assert token_text(tok, tok.bos_token_id) == "<s>"


def test_whitespace_tokens_stay_visible():
    from dashboards.render import token_label, token_spans

    assert token_label("  ") == "··" and token_label("\n") == "↵" and token_label(" a\tb") == " a⇥b"
    markup = token_spans(["a", "\n", "  ", "b"], [0.0] * 4, 1.0, line_breaks=True)
    assert visible_text(markup) == "a\n  b" and 'data-show="↵"' in markup and 'class="tok ws"' in markup
    assert visible_text(token_spans(["a", "\n"], [0.0, 0.0], 1.0)) == "a↵"  # one-line examples
