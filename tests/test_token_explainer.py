"""Planted features: the token explainer recovers known token sets; scorers separate them from a control."""

import numpy as np
import pytest

from pipeline.explain.examples import Windows
from pipeline.explain.scorers import embedding_score, simulation_score, token_set_from_text, window_text
from pipeline.explain.token_explainer import Background, TokenSet, explain_tokens, label

FILLER = [" the", " a", " of", " and", " to", " in", " is", " it", " was", " for", " on", " with", " as", " at"]
DIGITS = [str(d) for d in range(10)]
SPORTS = [" goal", " match", " team", " score", " player", " league", " coach", " stadium"]
FINANCE = [" bank", " stock", " market", " price", " loan", " interest", " investor", " profit"]
VOCAB = ["<bos>", *FILLER, *DIGITS, "(", ")", *SPORTS, *FINANCE]
ID = {t: i for i, t in enumerate(VOCAB)}
RADIUS = 4


def corpus(seed=0, n_ctx=300, ctx_len=48) -> np.ndarray:
    """Mostly filler; digits, brackets and topic words sprinkled in."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.0] + [6.0] * len(FILLER) + [0.4] * 10 + [1.0, 1.0] + [0.5] * 16)
    tokens = rng.choice(len(VOCAB), size=(n_ctx, ctx_len), p=weights / weights.sum())
    tokens[:, 0] = ID["<bos>"]
    return tokens


def activations(tokens: np.ndarray, rule: str) -> np.ndarray:
    """The planted feature's activation on every token (deterministic, strength varies by token)."""
    ids = {
        "digits": [ID[d] for d in DIGITS],
        "close": [ID[")"]],
        "sports": [ID[w] for w in SPORTS],
        "finance": [ID[w] for w in FINANCE],
    }
    if rule == "after_open":
        acts = np.zeros(tokens.shape, dtype=np.float32)
        acts[:, 1:] = np.where(tokens[:, :-1] == ID["("], 2.0 + (tokens[:, 1:] % 3), 0.0)
        return acts
    return np.where(np.isin(tokens, ids[rule]), 1.0 + (tokens % 4), 0.0).astype(np.float32)


def windows_at(tokens, acts, places) -> Windows:
    offsets = np.arange(-RADIUS, RADIUS + 1)
    rows, cols = places[:, 0], places[:, 1]
    positions = cols[:, None] + offsets[None, :]
    inside = (positions >= 0) & (positions < tokens.shape[1])
    clipped = positions.clip(0, tokens.shape[1] - 1)
    return Windows(
        np.where(inside, tokens[rows[:, None], clipped], -1),
        np.where(inside, acts[rows[:, None], clipped], 0.0).astype(np.float32),
        rows * tokens.shape[1] + cols,
    )


def planted(rule: str, seed=0):
    """(train, test windows, labels) for one planted feature: 60 train, 50 + 50 test, disjoint contexts."""
    tokens = corpus(seed)
    acts = activations(tokens, rule)
    firing = np.argwhere(acts > 0)
    firing = firing[(firing[:, 1] >= RADIUS) & (firing[:, 1] < tokens.shape[1] - RADIUS)]
    train_ctx = firing[:, 0] < 150
    rng = np.random.default_rng(seed + 1)
    train = windows_at(tokens, acts, rng.permutation(firing[train_ctx])[:60])
    positives = windows_at(tokens, acts, rng.permutation(firing[~train_ctx])[:50])
    window_max = np.stack([acts[:, c - RADIUS : c + RADIUS + 1].max(1) for c in range(RADIUS, 48 - RADIUS)], 1)
    quiet = np.argwhere(window_max == 0)
    quiet = quiet[quiet[:, 0] >= 150] + [0, RADIUS]
    negatives = windows_at(tokens, acts, rng.permutation(quiet)[:50])
    test = Windows.concat(positives, negatives)
    labels = np.arange(len(test)) < len(positives)
    return train, test, labels, Background(tokens, len(VOCAB), special_ids=[ID["<bos>"]])


@pytest.mark.parametrize(
    "rule, kind, keys",
    [
        ("digits", "token", DIGITS),
        ("close", "token", [")"]),
        ("after_open", "previous", ["("]),
        ("sports", "token", SPORTS),
    ],
)
def test_token_explainer_recovers_the_planted_set(rule, kind, keys):
    train, test, labels, background = planted(rule)
    made = explain_tokens(train, background, VOCAB)
    assert made.token_set.kind == kind
    assert {VOCAB[k] for k in made.token_set.keys} == set(keys)
    assert made.coverage == pytest.approx(1.0)
    score = simulation_score(made.token_set, test, labels, len(VOCAB))
    assert score.metrics["auroc"] > 0.99
    assert score.metrics["correlation"] > 0.8


def test_simulation_control_is_near_chance():
    """Another planted feature's explanation scores about 0.5 on this feature's test set."""
    train, test, labels, background = planted("digits")
    control = explain_tokens(planted("close")[0], background, VOCAB).token_set
    score = simulation_score(control, test, labels, len(VOCAB)).metrics
    assert abs(score["auroc"] - 0.5) < 0.15
    assert abs(score["correlation"]) < 0.15


def test_no_pattern_when_nothing_fires():
    train, _, _, background = planted("digits")
    quiet = Windows(train.tokens_EW, np.zeros_like(train.acts_EW), train.keys_E)
    made = explain_tokens(quiet, background, VOCAB)
    assert made.token_set.keys == () and "no token pattern" in made.text


def test_labels_read_naturally():
    assert label(TokenSet("token", (ID[")"],), (1.0,)), VOCAB, len(VOCAB)) == 'fires on ")"'
    assert label(TokenSet("previous", (ID["("],), (1.0,)), VOCAB, len(VOCAB)) == 'fires after "("'
    pair = ID["("] * len(VOCAB) + ID["7"]
    assert label(TokenSet("bigram", (pair,), (1.0,)), VOCAB, len(VOCAB)) == 'fires on "7" after "("'


def test_token_set_from_free_text():
    named = token_set_from_text('activates on "goal" and "match" in sports news', VOCAB)
    assert {VOCAB[k] for k in named.keys} == {" goal", " match"}
    unquoted = token_set_from_text("the stock market", VOCAB)
    assert {VOCAB[k] for k in unquoted.keys} == {" stock", " market"}


def test_embedding_scorer_prefers_the_true_topic():
    """Sports windows vs finance windows: the sports explanation beats the (shuffled) finance one."""
    from pipeline.explain.embedding import Embedder

    tokens = corpus(3)
    sports, finance = activations(tokens, "sports"), activations(tokens, "finance")
    places = lambda acts: np.argwhere(acts[:, RADIUS : 48 - RADIUS] > 0)[:30] + [0, RADIUS]  # noqa: E731
    test = Windows.concat(windows_at(tokens, sports, places(sports)), windows_at(tokens, finance, places(finance)))
    labels = np.arange(len(test)) < 30
    embedder = Embedder()
    examples = embedder.encode([window_text(t, VOCAB) for t in test.tokens_EW])
    true_text, shuffled_text = "goal match team score player league", "bank stock market price loan interest"
    true_vec, shuffled_vec = embedder.encode([true_text, shuffled_text])
    true = embedding_score(true_vec, examples, labels, test.keys_E).metrics["auroc"]
    shuffled = embedding_score(shuffled_vec, examples, labels, test.keys_E).metrics["auroc"]
    assert true > 0.9 > 0.1 > shuffled
