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


def set_field(page, name, value):
    """Types ``value`` into the Train form's field ``name`` (opening the section that holds it)."""
    box = page.locator(f"#adv-{name} input, #adv-{name} textarea").first
    if not box.is_visible():
        for acc in page.locator(f"#ls-train-form .ls-expert:has(#adv-{name}) > button").all():
            acc.click()
    if not box.is_visible():
        page.get_by_text("Advanced: every setting").click()
        page.get_by_text("Output, checkpoints, samples").click()
    box.fill(str(value))
    box.press("Tab")


def test_one_trigger_everywhere(app_page, app_server, images):
    page = app_page
    upload_and_caption(page, images[:3])
    folder = uploads_of(app_server, page)
    # a new trigger word rewrites the captions the app wrote, and the cards show it
    trig = page.locator("#ls-trigger input, #ls-trigger textarea").first
    trig.fill("sks")
    trig.press("Tab")
    expect(page.locator("#ls-check-msg")).to_contain_text("3** caption(s) rewritten".replace("**", ""),
                                                          timeout=30_000)
    for i in range(3):
        expect(page.locator(f"#ls-card-caption-{i} textarea")).to_have_value(re.compile(r"^a photo of sks, "))
    assert all(c.startswith("a photo of sks, ") for c in captions_on_disk(folder).values())
    # a caption without the trigger: Start refuses while pivotal tuning is on, and offers the fix
    box = page.locator("#ls-card-caption-2 textarea")
    box.fill("a red square on a gradient")
    box.press("Tab")
    expect(page.locator("#ls-check-msg")).to_contain_text("Saved the caption")
    page.get_by_role("tab", name="Train").click()
    set_field(page, "max_train_steps", 2)
    set_field(page, "validation_steps", 100)
    page.locator("#ls-start").click()
    expect(page.locator("#ls-train-status")).to_contain_text("do not contain the trigger word", timeout=30_000)
    expect(page.locator("#ls-train-status")).to_contain_text("photo 2.png")
    shot(page, "studio-2-start-refused")
    page.locator("#ls-fix-trigger").click()
    expect(page.locator("#ls-train-status")).to_contain_text("Added `sks` to 1 caption".replace("`", ""),
                                                             timeout=30_000)
    expect(page.locator("#ls-fix-trigger")).to_be_hidden()
    assert captions_on_disk(folder)["photo 2.png"] == "a photo of sks, a red square on a gradient"
    page.locator("#ls-start").click()
    expect(page.locator("#ls-train-status")).to_contain_text("submitted", timeout=30_000)
    expect(page.locator("#ls-progress[data-state=finished]")).to_be_visible(timeout=240_000)
    # Generate: the run's own trigger in the prompt and its hint
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#ls-gen-run input").first).to_have_value(re.compile("my-lora"), timeout=30_000)
    expect(page.locator("#ls-prompt textarea")).to_have_value("a photo of sks", timeout=30_000)
    expect(page.locator("#ls-prompt")).to_contain_text("sks")
    shot(page, "studio-3-generate-trigger")
