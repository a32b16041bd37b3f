"""The studio by clicking (issue 14): caption cards, one trigger everywhere, the short form, a page that keeps up,
a narrow window. Real ``python app.py``, headless Debian Chromium, screenshots in test-artifacts/."""
from __future__ import annotations

import json
import os
import re

import pytest
from playwright.sync_api import expect

from app_fixtures import images, start_app, stop_app  # noqa: F401  (fixtures)
from test_app_browser import (CHROMIUM, app_page, browser_context_args, browser_type_launch_args,  # noqa: F401
                              shot)

expect.set_options(timeout=30_000)  # a shared 2-core CI machine: redraws can take seconds
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The app for this module, with a start-up allowance for a busy shared CI machine."""
    server = start_app(str(tmp_path_factory.mktemp("app")), timeout=300)
    yield server
    stop_app(server)


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
    # offline, the demo captioner is preselected and says why
    expect(page.locator("#ls-caption-model input").first).to_have_value("tiny-blip")
    expect(page.locator("#ls-caption-model")).to_contain_text("Hugging Face Hub is not reachable")
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


def open_field(page, name):
    """Opens the expert section that holds the Train form's field ``name`` (the short form is always open)."""
    box = page.locator(f"#adv-{name} input, #adv-{name} textarea").first
    if not box.is_visible():
        from ui.train_form import group_of

        section = page.locator(f"#ls-expert-{group_of(name)}")
        if not section.is_visible():  # the expert switch is still folded
            page.locator("#ls-advanced").get_by_text("Expert settings").first.click()
        section.locator("button").first.click()
    expect(box).to_be_visible()
    return box


def set_field(page, name, value):
    """Types ``value`` into the Train form's field ``name``."""
    box = open_field(page, name)
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
    set_field(page, "max_train_steps", 3)
    set_field(page, "validation_steps", 100)
    open_field(page, "auto_fit").uncheck()  # no preflight: the tiny run starts at once
    set_field(page, "num_validation_images", 1)  # the final sample: one image in 2 steps
    set_field(page, "validation_inference_steps", 2)
    page.locator("#ls-start").click()
    expect(page.locator("#ls-train-status")).to_contain_text("do not contain the trigger word", timeout=30_000)
    expect(page.locator("#ls-train-status")).to_contain_text("photo 2.png")
    shot(page, "studio-2-start-refused")
    page.locator("#ls-fix-trigger").click()
    expect(page.locator("#ls-train-status")).to_contain_text("Added `sks` to 1 caption".replace("`", ""),
                                                             timeout=30_000)
    expect(page.locator("#ls-fix-trigger")).to_be_hidden()
    assert captions_on_disk(folder)["photo 2.png"] == "a photo of sks, a red square on a gradient"
    expect(page.locator("#ls-stop")).to_be_disabled()  # nothing runs yet, nothing to resume
    expect(page.locator("#ls-resume")).to_be_disabled()
    page.locator("#ls-start").click()
    expect(page.locator("#ls-train-status")).to_contain_text("submitted", timeout=30_000)
    expect(page.locator("#ls-stop")).to_be_enabled()
    expect(page.locator("#ls-progress")).not_to_contain_text("Waiting in line")  # nobody is ahead
    # a reload while it trains lands on Train, with the header there
    page.get_by_role("tab", name="Dataset").click()
    page.reload()
    expect(page.locator("#ls-tabs button[role=tab][aria-selected=true]")).to_have_text("Train", timeout=60_000)
    expect(page.locator("#ls-trigger")).to_be_visible()
    expect(page.locator("#ls-progress[data-state=finished]")).to_be_visible(timeout=240_000)
    expect(page.locator("#ls-stop")).to_be_disabled()
    # Generate: the run's own trigger in the prompt and its hint
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#ls-gen-run input").first).to_have_value(re.compile("my-lora"), timeout=30_000)
    expect(page.locator("#ls-prompt textarea")).to_have_value("a photo of sks", timeout=30_000)
    expect(page.locator("#ls-prompt")).to_contain_text("sks")
    expect(page.locator("#ls-header")).to_be_hidden()  # concept and trigger change nothing here
    shot(page, "studio-3-generate-trigger")
    page.reload()  # a reload lands on the tab that was open
    expect(page.locator("#ls-tabs button[role=tab][aria-selected=true]")).to_have_text("Generate", timeout=60_000)


def test_short_form_allowlist_length_and_marked_fields(app_page, app_server, images):
    from ui.allowlist import VISITOR_FIELDS
    from ui.train_form import SHORT_FIELDS

    page = app_page
    page.locator("#ls-upload input[type=file]").set_input_files(images)
    expect(page.locator(".ls-card")).to_have_count(len(images), timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    form = page.locator("#ls-train-form")
    expect(form.locator("#adv-rank")).to_be_visible()
    ids = form.locator("[id^=adv-]").evaluate_all("els => els.map(e => e.id)")
    names = {i[len("adv-"):] for i in ids}
    assert names <= set(VISITOR_FIELDS), names - set(VISITOR_FIELDS)  # nothing a visitor may not set
    shown = {n for n in names if form.locator(f"#adv-{n}").is_visible()}
    assert shown == set(SHORT_FIELDS) and 8 <= len(shown) <= 12, shown
    # plain labels with the preset's value, not flag names
    expect(form.locator("#adv-steps_per_image")).to_contain_text("Steps per image")
    expect(form.locator("#adv-steps_per_image")).to_contain_text("Preset: 120")
    for n in shown:
        assert "_" not in form.locator(f"#adv-{n} label, #adv-{n} .label").first.inner_text()
    # the run's length before Start: the face preset's 120 steps per image on 4 images
    expect(page.locator("#ls-run-length")).to_contain_text("480 steps on 4 image(s)", timeout=30_000)
    set_field(page, "max_train_steps", 30)
    expect(page.locator("#ls-run-length")).to_contain_text("30 steps on 4 image(s)")
    # a bad value marks its field, named in the form's words; an expert one opens its section
    set_field(page, "rank", 0)
    set_field(page, "lr_warmup_steps", -5)
    page.locator("#ls-advanced").get_by_text("Expert settings").first.click()  # fold it: Start opens it again
    page.locator("#ls-start").click()
    expect(page.locator("#ls-train-status")).to_contain_text("LoRA rank", timeout=30_000)
    expect(page.locator("#ls-train-status")).to_contain_text("Warm-up steps")
    expect(page.locator("#adv-rank")).to_have_class(re.compile("ls-bad"))
    expect(page.locator("#adv-lr_warmup_steps")).to_have_class(re.compile("ls-bad"))
    expect(page.locator("#adv-lr_warmup_steps input").first).to_be_visible()
    expect(page.locator("#adv-max_train_steps")).not_to_have_class(re.compile("ls-bad"))
    shot(page, "studio-4-short-form-error")


OUT_OF_VIEW = """(w) => [...document.querySelectorAll(
    '[data-testid=block-info], .label-text, #ls-tabs .tab-wrapper button, label')]
  .filter(e => e.offsetParent !== null).map(e => { const r = e.getBoundingClientRect();
    return [e.innerText.slice(0, 40), Math.round(r.left), Math.round(r.right), e.scrollWidth > e.clientWidth + 1]; })
  .filter(x => x[1] < 0 || x[2] > w || x[3])"""


@pytest.mark.parametrize("width", [390, 1400])
def test_tabs_and_labels_fit_the_window(page, app_server, width):
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(app_server.url)
    expect(page.locator("#ls-upload")).to_be_visible(timeout=60_000)
    for tab in ("Dataset", "Train", "Generate", "Publish"):  # every tab a visible button inside the window
        button = page.locator("#ls-tabs .tab-wrapper button:visible", has_text=tab)
        expect(button).to_have_count(1)
        box = button.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (tab, box)
    assert page.evaluate(OUT_OF_VIEW, width) == []
    # an unchecked checkbox shows its box
    page.locator("#ls-overwrite input").uncheck()
    border = page.locator("#ls-overwrite input").evaluate("e => getComputedStyle(e).borderTopWidth")
    assert float(border.rstrip("px")) >= 2, border
    shot(page, f"studio-5-dataset-{width}px")
    page.locator("#ls-tabs .tab-wrapper button:visible", has_text="Train").click()
    expect(page.locator("#adv-rank")).to_be_visible()
    assert page.evaluate(OUT_OF_VIEW, width) == []
    shot(page, f"studio-6-train-{width}px")
