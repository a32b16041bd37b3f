"""The app's look: a built-in Gradio theme (its fonts are served locally, so it works offline) and the studio's
own CSS (caption cards, visible checkboxes, a narrow window)."""
import gradio as gr

from .caption_cards import CARDS_CSS


def make_theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate")


STUDIO_CSS = CARDS_CSS
