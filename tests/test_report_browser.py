"""The HTML report opened in a real headless browser: Chromium from the system's packages (apt-get
install chromium; .ci/run does it), driven by Playwright's Python client pointed at that executable.
Skipped, with the reason, where either is missing."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from treeopt.reports.report import write_report
from test_report import make_run
from treeopt.core.tree import Tree

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine: apt-get install chromium")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The demo-like report, loaded in headless Chromium; console errors collected on page.errors."""
    _, html = write_report(make_run(tmp_path_factory.mktemp("browser") / "run"))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        yield page
        browser.close()


def test_figures_load(page):
    images = page.evaluate("() => [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight,"
                           " i.getBoundingClientRect().width])")
    assert len(images) == 7
    for alt, complete, width, height, shown in images:
        assert complete and width > 200 and height > 200 and shown > 100, alt  # decoded and laid out
    assert page.errors == []


def test_tables_render(page):
    tables = page.evaluate("() => [...document.querySelectorAll('table')].map(t => [t.rows.length, "
                           "t.rows[0].cells.length, t.getBoundingClientRect().height, t.innerText])")
    assert len(tables) >= 7
    for rows, cols, height, text in tables:
        assert rows >= 2 and cols >= 2 and height > 20 and text.strip()
    headers = page.evaluate("() => [...document.querySelectorAll('th')].map(th => th.innerText)")
    assert {"nodes", "tree", "heldout", "of_ceiling", "input", "basis"} <= set(headers)


def test_links_resolve(page):
    hrefs = page.evaluate("() => [...document.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.href])")
    anchors = [h for h, _ in hrefs if h.startswith("#")]
    files = [url for h, url in hrefs if not h.startswith("#")]
    assert len(anchors) >= 9 and len(files) >= 5
    for a in anchors:
        assert page.evaluate("id => !!document.getElementById(id)", a[1:]), a
    for url in files:
        assert urlparse(url).scheme == "file" and Path(unquote(urlparse(url).path)).is_file(), url


def test_trees_are_copyable_text(page):
    text = page.inner_text("pre")
    names = []
    for line in text.strip().splitlines():
        name, _, choices = line.partition(" = ")
        assert Tree.from_choices(ast.literal_eval(choices)).num_nodes > 0
        names.append(name)
    assert {"searched_16", "mc_sim_7b_63", "chain_4"} <= set(names)
