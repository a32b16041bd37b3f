"""The app's look: a built-in Gradio theme (its fonts are served locally, so it works offline) and the studio's
own CSS (caption cards, marked fields, visible checkboxes, a narrow window)."""
import gradio as gr

from .caption_cards import CARDS_CSS
from .train_form import FORM_CSS


def make_theme():
    # An unchecked checkbox keeps a dark, 2 px border: the theme's default is nearly invisible on white.
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate").set(
        checkbox_border_color="*neutral_500", checkbox_border_width="2px",
        checkbox_border_color_dark="*neutral_400")


# A phone (390 px) or a narrow window: every tab stays a visible button (they wrap instead of hiding in an
# overflow menu) and labels wrap instead of being cut.
NARROW_CSS = """
#ls-tabs .tab-wrapper {height: auto !important;}
#ls-tabs .tab-container {flex-wrap: wrap !important; height: auto !important; overflow: visible !important;}
#ls-tabs .tab-container.visually-hidden {display: none !important;}
#ls-tabs .tab-wrapper {flex-wrap: wrap !important;}
#ls-tabs .tab-container button {padding-left: 10px !important; padding-right: 10px !important;}
#ls-tabs .overflow-menu > button {display: none !important;}
#ls-tabs .overflow-dropdown, #ls-tabs .overflow-dropdown.hide {display: flex !important; position: static !important;
  box-shadow: none !important; border: none !important; background: none !important; flex-direction: row !important;
  padding: 0 !important;}
[data-testid="block-info"], .block-info, label > span {white-space: normal !important; overflow: visible !important;
  text-overflow: clip !important;}
@media (max-width: 600px) {
  .gradio-container {padding-left: 6px !important; padding-right: 6px !important;}
  #ls-header {flex-direction: column;}
}
"""

# The theme's checkbox border width does not reach Gradio 6's checkbox input: say it here too.
CHECKBOX_CSS = """
input[type="checkbox"] {border: 2px solid var(--neutral-500) !important;}
input[type="checkbox"]:checked {border-color: var(--color-accent) !important;}
"""

STUDIO_CSS = CHECKBOX_CSS + CARDS_CSS + FORM_CSS + NARROW_CSS
