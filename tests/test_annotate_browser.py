"""The labelling page in a real browser: headless Chromium (Debian's, driven by Playwright; installed by
scripts/install_browser.sh). A person's session: name prompt, keyboard and mouse labels, a reason, undo, a
reload that keeps the progress, the server going away and coming back, and an export that holds exactly
those labels. The server listens on 127.0.0.1 only. The screenshot lands in the test's tmp folder."""

import json
import os
import shutil

import pytest

from tether.annotate import AnnotateServer, Item, LabelStore, export
from tether.annotate.server import render_markdown


def browser_or_skip():
    """(sync_playwright, chromium path); under CI a missing browser fails the run instead of skipping."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or chromium is None:
        message = "no headless browser: run scripts/install_browser.sh (playwright from PyPI, chromium from apt)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright, chromium


def test_label_with_keyboard_and_mouse_undo_reload_and_export(tmp_path):
    sync_playwright, chromium = browser_or_skip()
    store = LabelStore(tmp_path / "labels.db")
    texts = [("What is 2+2?", "4", "5"), ("Capital of France?", "Paris", "Lyon"), ("Say hi", "hi", "go away"),
             ("3*3?", "9", "6"), ("Sky colour?", "blue", "green")]
    store.initialise([Item(i, p, a, b) for i, (p, a, b) in enumerate(texts)], overlap=1, seed=0)
    guidelines = render_markdown("# How to judge\n- Prefer the **correct** answer.\n- Then the kinder one.")
    server = AnnotateServer(store, host="127.0.0.1", port=0, guidelines_html=guidelines)
    server.start_in_thread()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"

    def shown():
        return int(page.text_content("#item-id").strip("()item ")), page.inner_text("#left"), page.inner_text("#right")

    def wait_saved(item_id):
        page.wait_for_function(f"document.getElementById('notice').textContent.startsWith('Saved item {item_id}:')")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        try:
            page.goto(server.url)
            page.fill("#name-input", "alice")  # no ?annotator=: the page asks for a name
            page.press("#name-input", "Enter")
            page.wait_for_function("document.getElementById('item-id').textContent === '(item 0)'")
            assert "annotator=alice" in page.url and "Prefer the correct answer" in page.inner_text("#guidelines")
            expected = {}

            item, left, right = shown()
            page.keyboard.press("1")  # A (left) is better
            wait_saved(item)
            expected[item] = left
            item, left, right = shown()
            page.click("button[data-choice=right]")  # the mouse: B (right) is better
            wait_saved(item)
            expected[item] = right
            item, left, right = shown()
            page.keyboard.press("3")  # tie ...
            wait_saved(item)
            page.keyboard.press("u")  # ... undone: the same pair comes back
            page.wait_for_function("document.getElementById('notice').textContent.startsWith('Undid')")
            assert shown() == (item, left, right)
            page.fill("#reason", "1 and 2 typed here are text, not labels")
            page.press("#reason", "Escape")
            page.keyboard.press("2")
            wait_saved(item)
            expected[item] = right
            assert page.inner_text("#count").startswith("3 / 5 done by you")

            page.reload()  # progress and the next pair are kept
            page.wait_for_function("document.getElementById('count').textContent.startsWith('3 / 5')")
            item, left, right = shown()
            assert item == 3

            server.shutdown()  # the server goes away; the label waits in the page and is retried
            server.server_close()
            page.keyboard.press("1")
            page.wait_for_selector("#banner", state="visible")
            assert "Cannot reach the tether annotate server" in page.inner_text("#banner")
            server = AnnotateServer(store, host="127.0.0.1", port=port, guidelines_html=guidelines)
            server.start_in_thread()
            wait_saved(item)
            assert not page.is_visible("#banner")
            expected[item] = left
            page.screenshot(path=str(tmp_path / "annotate.png"), full_page=True)
        finally:
            browser.close()
            server.shutdown()
            server.server_close()

    counts = export(store, tmp_path / "preferences.jsonl", tmp_path / "items.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert counts["rows"] == 4 and counts["too_few_votes"] == 1
    assert rows == [{"prompt": texts[i][0], "chosen": expected[i],
                     "rejected": texts[i][2] if expected[i] == texts[i][1] else texts[i][1]} for i in range(4)]
    meta = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [label["choice"] for label in meta[2]["labels"]] == [meta[2]["decision"]]  # the undone tie is gone
    assert meta[2]["labels"][0]["reason"] == "1 and 2 typed here are text, not labels"
    assert len(store.labels(active_only=False)) == 5  # ... but kept in the store, stamped undone
    assert (tmp_path / "annotate.png").stat().st_size > 10_000
