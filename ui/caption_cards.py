"""The caption cards of the Dataset tab: one card per image (the whole image as a thumbnail, its name, its
caption to edit, a Remove button), drawn with ``@gr.render`` from a ``gr.State`` holding the dataset's cards.

A caption is saved when its box loses focus (or on Enter); Remove deletes that one image and redraws the cards.
"""
from __future__ import annotations

import gradio as gr

from .dataset_files import cards_of, gallery_of, read_records, remove_image, set_caption, table_of

# Cards sit in a wrapping grid; the thumbnail keeps the image's whole frame (contain, not cover); a long file
# name wraps instead of being cut.
CARDS_CSS = """
#ls-cards {display: flex; flex-wrap: wrap; gap: 10px;}
#ls-cards > .ls-card {flex: 0 1 200px; min-width: 160px !important; max-width: 240px;}
.ls-card img {object-fit: contain !important;}
.ls-card-name, .ls-card-name p {overflow-wrap: anywhere; word-break: break-all; font-size: 0.85em; margin: 0;}
"""


def build(ctx, cards, gallery, table, msg):
    """Draws the cards of ``cards`` (a gr.State of :func:`ui.dataset_files.cards_of`); a removal updates
    ``cards``, the (hidden) ``gallery`` and ``table`` the API returns, and says so in ``msg``."""
    ws = ctx.ws_state

    def folder_of(ws_id, request):
        return ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))

    def save_one(name):
        def save(caption, ws_id, request: gr.Request):
            if not set_caption(folder_of(ws_id, request), name, caption):
                return f"'{name}' is no longer in the dataset."
            return f"Saved the caption of `{name}`."
        return save

    def remove_one(name):
        def remove(ws_id, request: gr.Request):
            sid = ctx.sid(ws_id, request)
            folder = ctx.workspaces.uploads_dir(sid)
            gone = remove_image(folder, name)
            ctx.files.purge(sid)  # the removed photo's served copies go (the others are made again when shown)
            recs = read_records(folder)
            text = (f"Removed `{name}`; the dataset has **{len(recs)}** image(s)." if gone
                    else f"'{name}' was already gone.")
            return cards_of(recs), ctx.served(sid, gallery_of(recs)), table_of(recs), text
        return remove

    @gr.render(inputs=[cards, ws])
    def draw(items, ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request) if items else None
        if not items:
            gr.Markdown("No images yet: add some above.", elem_id="ls-no-cards")
            return
        with gr.Row(elem_id="ls-cards"):
            for i, card in enumerate(items):
                with gr.Column(elem_classes=["ls-card"], elem_id=f"ls-card-{i}", min_width=160):
                    gr.Image(ctx.served(sid, card["path"]), show_label=False, interactive=False, height=150, buttons=[],
                             container=False, elem_classes=["ls-card-img"])
                    gr.Markdown(f"`{card['name']}`", elem_classes=["ls-card-name"])
                    box = gr.Textbox(card["caption"], label=f"Caption of {card['name']}", show_label=False,
                                     interactive=True, lines=2, max_lines=6,
                                     placeholder="caption", elem_classes=["ls-card-caption"],
                                     elem_id=f"ls-card-caption-{i}")
                    rm = gr.Button("Remove", size="sm", variant="stop", elem_id=f"ls-card-remove-{i}")
                    gr.on([box.blur, box.submit], save_one(card["name"]), [box, ws], [msg],
                          api_visibility="private", show_progress="hidden")
                    rm.click(remove_one(card["name"]), [ws], [cards, gallery, table, msg],
                             api_visibility="private")
