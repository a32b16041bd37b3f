"""The app's look: a built-in Gradio theme (its fonts are served locally, so it works offline)."""
import gradio as gr


def make_theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate")
