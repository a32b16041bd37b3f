"""The form remembers itself across reloads.

Every change of the concept type, trigger word, base model, run name or any Advanced setting is saved in the
session's workspace (``choices.json``, see ``sessions.Workspaces``); when the page loads again the saved values
are put back, together with the preset values they were last filled from, so that re-applying the concept's
preset keeps every hand edit and changes nothing else. A saved value a component would refuse (a choice that
no longer exists, another type) is left out rather than breaking the page.
"""
from __future__ import annotations

import gradio as gr


def _choices_of(comp) -> list | None:
    choices = getattr(comp, "choices", None)
    if choices is None or getattr(comp, "allow_custom_value", False):
        return None
    return [c[1] if isinstance(c, (tuple, list)) else c for c in choices]


def acceptable(comp, value) -> bool:
    """True when ``value`` can be put back into ``comp`` as it is."""
    if isinstance(comp, gr.State):
        return isinstance(value, dict)
    allowed = _choices_of(comp)
    if allowed is not None:
        return value in allowed
    if isinstance(comp, gr.Checkbox):
        return isinstance(value, bool)
    if isinstance(comp, gr.Number):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    return value is None or isinstance(value, str)


def wire(ctx, load_ev, fields: dict) -> None:
    """Saves ``fields`` (name -> component or gr.State) on every change; restores them after ``load_ev``."""
    names = list(fields)
    comps = [fields[n] for n in names]
    ws = ctx.ws_state

    def save(sid, *values):
        if sid:
            ctx.workspaces.save_choices(sid, dict(zip(names, values)))

    gr.on([c.change for c in comps], save, [ws] + comps, None, api_visibility="private",
          trigger_mode="always_last")

    def restore(sid):
        saved = ctx.workspaces.load_choices(sid) if sid else {}
        out = []
        for n, c in zip(names, comps):
            ok = n in saved and acceptable(c, saved[n])
            if isinstance(c, gr.State):
                out.append(saved[n] if ok else gr.skip())
            else:
                out.append(gr.update(value=saved[n]) if ok else gr.skip())
        return out

    load_ev.then(restore, [ws], comps, api_visibility="private")


# The tabs where the concept type and trigger word (the header above the tabs) matter.
HEADER_TABS = ("dataset", "train")


def wire_tabs(ctx, load_ev, tabs, header) -> None:
    """The open tab is kept in the browser (``gr.BrowserState``): a reload lands on it, and on Train while this
    session's run is queued or training. The header (concept type, trigger word) shows on Dataset and Train,
    the tabs they change."""
    from . import jobs as J

    open_tab = gr.BrowserState("dataset", storage_key="lora-studio-tab")

    def selected(evt: gr.SelectData):
        # the tab's label ("Train") names its id ("train"); the tab ids are the labels in lower case
        tab = str((evt._data or {}).get("id") or evt.value or "dataset").strip().lower()
        return tab, gr.update(visible=tab in HEADER_TABS)

    tabs.select(selected, None, [open_tab, header], api_visibility="private", show_progress="hidden")

    def land(saved, sid):
        job = ctx.jobs.latest(sid) if sid else None
        tab = "train" if job is not None and job.state in J.ACTIVE else (saved or "dataset")
        return gr.Tabs(selected=tab), tab, gr.update(visible=tab in HEADER_TABS)

    load_ev.then(land, [open_tab, ctx.ws_state], [tabs, open_tab, header], api_visibility="private",
                 show_progress="hidden")
