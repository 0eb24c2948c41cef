"""The dashboard in a real browser: `saescope serve` on the tiny run, driven with Debian's Chromium.

Playwright drives /usr/bin/chromium (from `apt-get install chromium`); it never
downloads a browser. Without Chromium the test is skipped, except in CI (CI=true),
where a missing browser is a failure. Screenshots go to the test's temp folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, limit_s: float = 120) -> None:
    """Poll Streamlit's health endpoint until it answers (or the server exits, or the limit passes)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"saescope serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the dashboard did not answer its health check")


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: `apt-get install chromium` (the README's test command does it)")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def serving(run: Path, home: Path):
    """`saescope serve --run RUN` on a free port; yields its address and stops the whole process group after."""
    port = free_port()
    script = Path(sys.executable).with_name("saescope")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    env = {**os.environ, "SAESCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*command, "serve", "--run", str(run), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        first = process.stdout.readline()
        assert f"127.0.0.1:{port}" in first or f"localhost:{port}" in first, first
        wait_healthy(url, process)
        yield url
    finally:
        os.killpg(process.pid, 2)  # Ctrl-C to the whole group: saescope stops its Streamlit child
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--server.port {port}" not in listing  # the Streamlit child is gone too


@pytest.fixture
def server(indexed_run, tmp_path):
    with serving(indexed_run[0], tmp_path / "home") as url:
        yield url


def test_feature_page_steering_and_probe_in_chromium(browser, server, indexed_run, tmp_path):
    from playwright.sync_api import expect

    from storage.index_queries import FeatureIndex

    with FeatureIndex(indexed_run[1]) as index:
        feature = index.list_features("max", limit=1)[0]["feature"]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/feature?id={feature}")
    page.get_by_text("Top examples").wait_for(timeout=60_000)
    tokens = page.locator("span.tok")
    tokens.first.wait_for(timeout=60_000)
    assert tokens.count() > 20
    alphas = tokens.evaluate_all(
        "spans => spans.map(s => parseFloat(getComputedStyle(s).backgroundColor.split(',')[3] || '1'))"
    )
    assert max(alphas) > 0.95 and min(alphas) == 0.0  # the strongest peak is fully shaded, silent tokens are not
    assert page.locator("span.tok[title]").count() == tokens.count()  # the value on hover
    page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)

    with page.context.expect_page() as opened:
        page.get_by_text("Steer with this feature").click()
    steer = opened.value
    steer.get_by_text("Generate at value").wait_for(timeout=60_000)
    # Streamlit's text input can paint empty for a moment before it shows its value: wait for it, then read it
    expect(steer.get_by_label("features")).to_have_value(str(feature), timeout=30_000)
    steer.get_by_label("max new tokens").fill("6")
    steer.get_by_text("Generate at value").click()
    steer.get_by_text("mean KL(default").wait_for(timeout=120_000)
    assert steer.get_by_role("heading", name="default").count() == 1
    assert steer.get_by_role("heading", name=f"steered: #{feature}").count() == 1
    steer.screenshot(path=str(tmp_path / "steer.png"), full_page=True)

    probe = browser.new_page(viewport={"width": 1400, "height": 1000})
    probe.goto(f"{server}/probe")
    probe.get_by_role("textbox", name="text").fill("The cat sat on the mat.")
    probe.get_by_text("Probe", exact=True).click()
    probe.get_by_text("features firing here").wait_for(timeout=120_000)
    probe.locator("span.tok").first.wait_for(timeout=60_000)
    assert probe.locator("span.tok").count() >= len("The cat sat on the mat.")
    probe.screenshot(path=str(tmp_path / "probe.png"), full_page=True)
    for name in ("feature", "steer", "probe"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_trace_page_click_selects_a_node_and_the_url_restores_the_view(browser, indexed_copy, tmp_path):
    """/trace on a hand-made graph: a click on a node selects it (its details below, clickedId in the URL);
    a URL with pinnedIds and clickedId opens that view again."""
    import json

    from test_trace_page import small_graph

    (indexed_copy / "graphs").mkdir()
    (indexed_copy / "graphs" / "cat.json").write_text(json.dumps(small_graph()), encoding="utf-8")
    with serving(indexed_copy, tmp_path / "home") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(f"{url}/trace?graph=cat")
        node = page.locator('.vega-embed path[aria-label$="node_id: 1_12_1"]')  # SVG: each node's tooltip text
        node.wait_for(timeout=60_000)
        box = node.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_function("() => new URLSearchParams(location.search).get('clickedId') === '1_12_1'")
        page.locator('div.trace-node[data-node="1_12_1"]').wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "trace-clicked.png"), full_page=True)

        page.goto(f"{url}/trace?graph=cat&pinnedIds=0_7_1&clickedId=E_9_1")
        page.locator('div.trace-node[data-node="E_9_1"]').wait_for(timeout=60_000)
        page.locator('div.trace-node[data-node="0_7_1"]').wait_for(timeout=30_000)  # the pinned node's details
        query = page.evaluate("() => Object.fromEntries(new URLSearchParams(location.search))")
        assert query == {"graph": "cat", "pinnedIds": "0_7_1", "clickedId": "E_9_1"}
        page.screenshot(path=str(tmp_path / "trace-restored.png"), full_page=True)


TRICKY = "Use `x` and *y* with $a+b$ and _b_ <script>alert(1)</script>\n```py\nx = 1\n```"


def assert_plain_text(shown: str) -> None:
    assert "<span" not in shown and 'class="tok"' not in shown and "data-act" not in shown, shown


@pytest.mark.slow
def test_real_model_generations_and_probe_show_text_exactly(browser, real_indexed, real_home, tmp_path):
    """On SmolLM2: every generation and the probe of markdown-like text read exactly as the decoded ids."""
    from playwright.sync_api import expect

    from pipeline.lm.packing import encode_prompt
    from pipeline.lm.token_text import load_tokenizer
    from storage.index_queries import FeatureIndex

    tokenizer = load_tokenizer("default", real_home / "models")
    with FeatureIndex(real_indexed / "saes" / "default" / "features.duckdb") as index:
        feature = index.list_features("max", limit=1)[0]["feature"]
    with serving(real_indexed, real_home) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/steer?feature={feature}")
        page.get_by_text("Generate at value").wait_for(timeout=120_000)
        expect(page.get_by_label("features")).to_have_value(str(feature), timeout=30_000)
        page.get_by_label("max new tokens").fill("12")
        page.get_by_label("temperature").fill("0")
        page.get_by_text("Generate at value").click()
        page.locator("div.generation").nth(1).wait_for(timeout=300_000)
        check_generations(page, tokenizer, 2)
        page.screenshot(path=str(tmp_path / "steer-real.png"))
        page.get_by_role("textbox", name="sweep values").fill("0, 4xmean")
        page.get_by_text("Sweep strengths").click()
        page.get_by_role("heading", name="4xmean (clamp to").wait_for(timeout=300_000)
        check_generations(page, tokenizer, 3)

        probe = browser.new_page(viewport={"width": 1400, "height": 1000})
        probe.goto(f"{url}/probe")
        probe.get_by_role("textbox", name="text").fill(TRICKY)
        probe.get_by_text("Probe", exact=True).click()
        probe.locator("span.tokens").first.wait_for(timeout=300_000)
        shown = probe.locator("span.tokens").last.inner_text()
        assert_plain_text(shown)
        assert shown == tokenizer.decode(encode_prompt(tokenizer, TRICKY))  # BOS, then the text as typed
        assert probe.locator(".katex").count() == 0  # no typeset math
        assert probe.locator("script", has_text="alert").count() == 0  # no live script
        probe.screenshot(path=str(tmp_path / "probe-real.png"))


def check_generations(page, tokenizer, expected: int) -> None:
    blocks = page.locator("div.generation").all()
    assert len(blocks) == expected
    for block in blocks:
        ids = [int(t) for t in block.get_attribute("data-ids").split(",") if t]
        shown = block.inner_text()
        assert_plain_text(shown)
        assert ids and shown == tokenizer.decode(ids), (block.get_attribute("data-role"), shown)


@pytest.mark.slow
def test_real_model_graph_page_draws_the_traced_prompt(browser, real_traced, real_home, tmp_path):
    """On SmolLM2: /trace draws the saved graph, the prompt reads exactly as traced, a node links its feature."""
    from conftest import TRACE_PROMPT

    from pipeline.lm.packing import encode_prompt
    from pipeline.lm.token_text import load_tokenizer
    from storage.graph_groups import read_graph_json

    tokenizer = load_tokenizer("default", real_home / "models")
    doc = read_graph_json(real_traced, "capital")
    assert doc["metadata"]["prompt_tokens"] == [tokenizer.decode([t]) for t in encode_prompt(tokenizer, TRACE_PROMPT)]
    with serving(real_traced, real_home) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/trace?graph=capital&clickedId={doc['nodes'][-1]['node_id']}")  # details need a selection
        page.locator(".vega-embed").first.wait_for(timeout=120_000)
        shown = page.locator("div.trace-prompt").first.inner_text()
        assert_plain_text(shown)
        assert shown.replace("\n", "") == "".join(doc["metadata"]["prompt_tokens"])
        assert page.locator(".katex").count() == 0
        details = page.locator("div.trace-node").first
        details.wait_for(timeout=60_000)
        assert_plain_text(details.inner_text())
        page.screenshot(path=str(tmp_path / "trace-real.png"), full_page=True)
