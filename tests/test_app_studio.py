"""The studio by clicking (issue 14): caption cards, one trigger everywhere, the short form, a page that keeps up,
a narrow window. Real ``python app.py``, headless Debian Chromium, screenshots in test-artifacts/."""
from __future__ import annotations

import json
import os
import re

import pytest
from playwright.sync_api import expect

from app_fixtures import app_server, images  # noqa: F401  (fixtures)
from test_app_browser import (CHROMIUM, app_page, browser_context_args, browser_type_launch_args,  # noqa: F401
                              shot)

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


def uploads_of(app_server, page) -> str:
    """The uploads folder of the page's session (the only session folder of a fresh page with uploads)."""
    root = os.path.join(app_server.root, "sessions")
    found = [os.path.join(root, s, "uploads") for s in os.listdir(root)
             if os.path.isfile(os.path.join(root, s, "uploads", "metadata.jsonl"))]
    newest = max(found, key=lambda d: os.path.getmtime(os.path.join(d, "metadata.jsonl")))
    return newest


def captions_on_disk(folder: str) -> dict:
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        return {d["file_name"]: d["text"] for d in map(json.loads, f) if d}


def upload_and_caption(page, images):
    page.locator("#ls-upload input[type=file]").set_input_files(images)
    expect(page.locator("#ls-upload-msg")).to_contain_text(f"Added {len(images)} image", timeout=30_000)
    expect(page.locator(".ls-card")).to_have_count(len(images))
    page.locator("#ls-caption-model textarea, #ls-caption-model input").first.fill("tiny-blip")
    page.locator("#ls-autocaption").click()
    expect(page.locator("#ls-card-caption-0 textarea")).to_have_value(re.compile("a photo of TOK"), timeout=60_000)


def test_caption_cards_edit_and_remove_one(app_page, app_server, images):
    page = app_page
    upload_and_caption(page, images)
    # every card shows its whole image and its full name
    for i in range(len(images)):
        card = page.locator(f"#ls-card-{i}")
        expect(card.locator("img")).to_be_visible()
        expect(card).to_contain_text(f"photo {i}.png")
    fit = page.locator("#ls-card-0 img").evaluate("e => getComputedStyle(e).objectFit")
    assert fit == "contain", fit
    folder = uploads_of(app_server, page)
    # edit one caption: saved when the box loses focus
    box = page.locator("#ls-card-caption-1 textarea")
    box.fill("a photo of TOK, edited by hand")
    box.press("Tab")
    expect(page.locator("#ls-check-msg")).to_contain_text("Saved the caption of")
    assert captions_on_disk(folder)["photo 1.png"] == "a photo of TOK, edited by hand"
    shot(page, "studio-1-cards")
    # remove one image: its card, its file and its caption go; the others stay
    page.locator("#ls-card-remove-0").click()
    expect(page.locator(".ls-card")).to_have_count(len(images) - 1)
    expect(page.locator("#ls-check-msg")).to_contain_text("Removed")
    assert not os.path.exists(os.path.join(folder, "photo 0.png"))
    caps = captions_on_disk(folder)
    assert "photo 0.png" not in caps and caps["photo 1.png"] == "a photo of TOK, edited by hand"
    expect(page.locator("#ls-card-0")).to_contain_text("photo 1.png")
