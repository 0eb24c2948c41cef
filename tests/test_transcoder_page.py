"""The transcoder feature page (``/feature?id=F&layer=L``) under AppTest on the tiny run with a transcoder set."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser

import pytest
import torch
from streamlit.testing.v1 import AppTest

from pipeline.features.transcoder_examples import interval_examples, latent_examples, layer_codes
from pipeline.lm.packing import special_mask
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.shards import activations_dir, read_manifest
from storage.training_data import last_context_tokens
from storage.transcoder_store import load_layer_files, read_set, set_dir

LAYER = 2


@pytest.fixture(scope="module")
def tc_run(tmp_path_factory, transcoder_run):
    run = tmp_path_factory.mktemp("tc-page") / "run"
    shutil.copytree(transcoder_run, run)
    return run


@pytest.fixture(scope="module", autouse=True)
def _release_shared_resources():
    yield
    import streamlit as st

    st.cache_resource.clear()


@pytest.fixture
def served(tc_run, monkeypatch):
    monkeypatch.setenv("SAESCOPE_RUN", str(tc_run))
    return tc_run


def page(**query) -> AppTest:
    app = AppTest.from_string("from dashboards.views import feature\nfeature.render()\n", default_timeout=120)
    for key, value in query.items():
        app.query_params[key] = str(value)
    return app


class Blocks(HTMLParser):
    """The visible text of each ``div`` with one of ``classes`` (style sheets skipped), token spans concatenated."""

    def __init__(self, classes: set[str]):
        super().__init__()
        self.classes, self.blocks, self.depth, self.in_style = classes, [], 0, False

    def handle_starttag(self, tag, attrs):
        self.in_style = tag == "style"
        if self.depth:
            self.depth += tag == "div"
        elif tag == "div" and dict(attrs).get("class") in self.classes:
            self.depth = 1
            self.blocks.append((dict(attrs), ""))

    def handle_endtag(self, tag):
        self.in_style = False
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.in_style:
            attrs, text = self.blocks[-1]
            self.blocks[-1] = (attrs, text + data)


def blocks(app: AppTest, cls: str) -> list[tuple[dict, str]]:
    parser = Blocks({cls})
    for element in app.get("html"):
        parser.feed(element.proto.body)
    return parser.blocks


def expected_codes(run, tiny_model):
    """Layer 2's codes recomputed from the pipeline over the cache's last held-out contexts, and those tokens."""
    folder = set_dir(run, "tc")
    manifest = read_manifest(activations_dir(run))
    n_ctx = min(64, read_set(folder)["training"]["heldout_contexts"])
    tokens_CT = last_context_tokens(activations_dir(run), manifest, n_ctx)
    tc = transcoder_from_saelens(*load_layer_files(folder, LAYER))
    ordinary_CT = ~special_mask(tokens_CT, manifest.special_token_ids)
    return layer_codes(tiny_model, tc, tokens_CT, LAYER, ordinary_CT), tokens_CT


def expected_examples(run, tiny_model, latent: int):
    """The page's top examples recomputed from the pipeline."""
    codes, tokens_CT = expected_codes(run, tiny_model)
    return tokens_CT, latent_examples(codes, latent, 10, 16)


def test_page_shows_header_output_tokens_and_live_examples(served, tiny_model, tokenizer):
    tokens_CT, expected = expected_examples(served, tiny_model, 5)
    app = page(id=5, layer=LAYER, transcoders="tc").run()
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    assert app.title[0].value == f"Transcoder feature 5 · layer {LAYER}"
    header = blocks(app, "transcoder-header")[0][1]
    for part in ("set tc", f"layer {LAYER}", "latent 5", "d_sae 64", "blocks.2.ln2.hook_normalized",
                 "blocks.2.hook_mlp_out"):  # fmt: skip
        assert part in header
    for side in ("promoted", "suppressed"):
        assert blocks(app, side), side
    markup = "".join(h.proto.body for h in app.get("html"))
    lens = markup[markup.index('class="promoted"') : markup.index('class="suppressed"')]
    assert len(re.findall(r'class="tok( ws)?"', lens)) == 10
    examples = blocks(app, "example")
    assert 1 <= len(examples) <= 10 and len(examples) == len(expected.examples)
    for (attrs, text), example in zip(examples, expected.examples, strict=True):
        assert int(attrs["data-context"]) == example.context
        ids = tokens_CT[example.context, example.start : example.start + len(example.acts)].tolist()
        shown = "".join(tokenizer.batch_decode([[i] for i in ids])).replace("\n", "↵")
        assert text == f"{example.activation:.3f} " + shown  # the decoded tokens, <bos> included: escaped
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["max activation"] == f"{expected.max_act:.4g}"
    assert not [m for m in app.markdown if "<" in m.value]
    shown_bins = blocks(app, "interval")
    expected_bins = interval_examples(expected_codes(served, tiny_model)[0], 5, 5, 3, 8)
    assert len(shown_bins) == len(expected_bins) >= 1
    for (_, text), entry in zip(shown_bins, expected_bins, strict=True):
        assert text.startswith(f"({entry.low:.3g}, {entry.high:.3g}] · {entry.n_tokens:,} tokens")
    assert len(blocks(app, "interval-example")) == sum(len(b.examples) for b in expected_bins)


def test_steering_with_a_latent_clamps_it_at_every_position(served, monkeypatch):
    import dashboards.transcoder_steer as steer

    seen = []
    real = steer.run_intervention
    monkeypatch.setattr(steer, "run_intervention", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    app = page(id=5, layer=LAYER, transcoders="tc").run()
    app.text_input[0].set_value("the cat")
    app.button[0].click().run()
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    max_act = float(next(m.value for m in app.metric if m.label == "max activation"))
    ((edit,),) = seen
    assert (edit.layer, edit.position, edit.feature) == (LAYER, None, 5)
    assert edit.value == pytest.approx(4.0 * max_act, rel=1e-3)
    assert [h for h in app.get("html") if 'data-role="intervened"' in h.proto.body]


def test_another_latent_of_the_same_layer_reuses_the_cached_codes(served, monkeypatch):
    import dashboards.views.transcoder_feature as view

    page(id=1, layer=LAYER).run()  # the run's only set is the default
    monkeypatch.setattr(view, "layer_codes", lambda *_: pytest.fail("the layer's codes were computed again"))
    app = page(id=2, layer=LAYER).run()
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"id": 64, "layer": LAYER}, "latent 64 out of range: layer 2's transcoder has 64 latents (0-63)"),
        ({"id": "x", "layer": LAYER}, "latent id 'x' is not a number"),
        ({"id": 1, "layer": 9}, "layer 9 is not in transcoder set 'tc' (layers 0-3)"),
        ({"id": 1, "layer": "top"}, "layer 'top' is not a number"),
        ({"id": 1, "layer": LAYER, "transcoders": "nope"}, "has no trained transcoder set 'nope'"),
    ],
)
def test_bad_parameters_are_one_error_line(served, query, message):
    app = page(**query).run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and message in app.error[0].value
    assert app.title[0].value == "Transcoder feature"


def test_render_helpers_escape_token_text(tiny_model):
    from dashboards.views.transcoder_feature import examples_html, logit_lens_html
    from pipeline.features.transcoder_examples import LatentExample, LatentExamples

    class Tricky:
        def batch_decode(self, ids, **_):
            return ["<b>", "&amp;", "$x$"][: len(ids)] + ["*y*"] * max(0, len(ids) - 3)

    stats = LatentExamples(0, 3, 2, 2.0, 1.5, [LatentExample(0, 0, 1, 2.0, [0.0, 2.0, 1.0])])
    markup = examples_html(stats.examples, stats.max_act, torch.tensor([[5, 6, 7]]), Tricky())
    assert "&lt;b&gt;" in markup and "&amp;amp;" in markup and "<b>" not in markup
    promoted, suppressed = logit_lens_html(tiny_model, Tricky(), torch.randn(32))
    assert "&lt;b&gt;" in promoted and "<b>" not in promoted + suppressed


def test_page_reads_the_layer_index_when_there_is_one(tc_run, tmp_path, monkeypatch):
    from jobs.index import IndexConfig
    from jobs.index_transcoders import run_transcoder_index
    from storage.index_queries import open_transcoder_index

    run = tmp_path / "run"
    shutil.copytree(tc_run, run)
    cfg = IndexConfig(run=str(run), transcoders="tc", layers=str(LAYER), device="cpu", top_k=5, window=4,
                      tokens=32 * 100, dense_threshold=0.05)  # fmt: skip
    run_transcoder_index(cfg)
    with open_transcoder_index(set_dir(run, "tc"), LAYER) as index:
        latent = next(f for f in range(64) if index.summary(f)["n_active"])
        stats, top = index.summary(latent), index.top_examples(latent, 10)
        promoted = [e["token"] for e in index.logit_tokens(latent)["promoted"]]
    monkeypatch.setenv("SAESCOPE_RUN", str(run))
    app = page(id=latent, layer=LAYER, transcoders="tc").run()
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["max activation"] == f"{stats['max_act']:.4g}"
    assert metrics["mean (when active)"] == f"{stats['mean_act']:.4g}"
    assert blocks(app, "promoted")[0][1] == "".join(promoted).replace("\n", "↵")
    shown = blocks(app, "example")  # top examples first, then the interval examples
    assert top and [text.split(" ")[0] for _, text in shown[: len(top)]] == [f"{e.activation:.3f}" for e in top]
    captions = " ".join(c.value for c in app.caption)
    assert "indexed tokens" in captions and "computed live" not in captions
    assert ("dense:" in captions) == (stats["density"] > 0.05)
