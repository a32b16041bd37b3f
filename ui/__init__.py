"""The Gradio UI of the LoRA studio: one module per tab, wired together by :func:`build_app`.

``app.py`` only parses flags and calls :func:`build_app` then ``demo.launch(**launch_kwargs)``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import gradio as gr

from trainer.devices import cuda_available

from .allowlist import Policy
from .jobs import JobManager
from .file_guard import FileGuard, SessionFiles
from .sessions import BrowserCookie, SessionLimitError, WorkspaceRefused, Workspaces, browser_of, valid_session_id





class EngineHolder:
    """One shared generation engine (``generation.Engine``), created on first use."""

    def __init__(self):
        self._engine = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._engine is None:
                from generation import Engine

                self._engine = Engine()
            return self._engine

    def release(self) -> None:
        with self._lock:
            eng = self._engine
        if eng is not None:
            try:
                eng.release()
            except Exception:
                pass


@dataclass
class AppContext:
    workspaces: Workspaces
    jobs: JobManager
    engine: EngineHolder
    cuda: bool = False
    policy: Policy = field(default_factory=Policy)  # what visitors may choose (ui/allowlist.py)
    ws_state: Any = None  # gr.State holding the workspace id of this browser session
    components: dict = field(default_factory=dict)
    files: Optional[SessionFiles] = None  # the served copies of session files (ui/file_guard.py)

    def sid(self, ws: Optional[str], request) -> str:
        """The workspace id of a call: the one the page loaded with (held by this browser's cookie), else, for an
        API client, its own Gradio session hash (never a browser's workspace). Else a gr.Error."""
        browser = browser_of(request)
        if ws and valid_session_id(ws):
            sid, api = ws, False
        else:
            sid = getattr(request, "session_hash", None) if request is not None else None
            if not sid or not valid_session_id(sid):
                raise gr.Error("No session: reload the page.")
            api = True
        try:
            self.workspaces.check_access(sid, browser, api=api)
        except WorkspaceRefused as e:
            raise gr.Error(str(e))
        return sid

    def served(self, sid: str, items):
        """A gallery value (``[(path, caption)]``) or one path, as copies only session ``sid`` is handed."""
        if isinstance(items, str):
            return self.files.copy_for(sid, items)
        return self.files.copies_for(sid, items)


def _release_captioners() -> None:
    try:
        import captioning

        captioning.release_all()
    except Exception:
        pass


CSS = """
#ls-progress .bar {height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden;}
#ls-progress .fill {height: 100%; background: var(--color-accent); transition: width .4s;}
#ls-progress .txt {margin-top: 4px; font-variant-numeric: tabular-nums;}
.ls-notice {padding: 8px 12px; border-radius: 8px; background: var(--color-accent-soft);}
footer {display: none !important;}
"""


def build_app(root: str = "outputs", max_idle_s: float = 6 * 3600, cleaner_every_s: float = 600,
              policy: Optional[Policy] = None, start_jobs: bool = True):
    """Returns ``(demo, launch_kwargs)``; ``policy`` holds the operator's choices for visitors. With
    ``start_jobs=False`` no job trains until ``demo.ls_context.jobs.start()`` (``app.py`` calls it once the
    server is up, so a job restored from the queue does not slow the launch)."""
    from . import choices, dataset_tab, generate_tab, publish_tab, train_tab
    from .theme import STUDIO_CSS, make_theme

    policy = policy or Policy()
    workspaces = Workspaces(root, max_idle_s=max_idle_s, max_sessions=policy.max_sessions)
    engine = EngineHolder()
    # the queue is durable (ui/queue_store.py): queued and running jobs come back after a restart
    jobs = JobManager(before_train=[_release_captioners, engine.release],
                      store=os.path.join(workspaces.root, "queue.json"),
                      max_runs_per_session=policy.max_runs_per_session, start=start_jobs)
    ctx = AppContext(workspaces=workspaces, jobs=jobs, engine=engine, cuda=cuda_available(), policy=policy,
                     files=SessionFiles(workspaces.sessions_root))
    workspaces.on_clean.append(ctx.files.purge)  # an idle session's served copies go with its uploads
    workspaces.start_cleaner(every_s=cleaner_every_s, busy_fn=jobs.active_sessions)

    # Gradio's own cache (uploads before they are ingested, copies of generated images) ages out like the uploads.
    cache_age = int(max(600, min(max_idle_s, 24 * 3600)))
    with gr.Blocks(title="LoRA studio", delete_cache=(max(60, min(cache_age, 3600)), cache_age)) as demo:
        ctx.ws_state = gr.State(None)
        browser_ws = gr.BrowserState(None, storage_key="lora-studio-workspace")
        gr.Markdown("# LoRA studio\nA few photos in, a Stable Diffusion LoRA out: **Dataset → Train → Generate → "
                    "Publish**.")
        with gr.Row(elem_id="ls-header") as header:
            ctx.components["concept"] = gr.Dropdown(
                ["face", "style", "object", "custom"], value="face", label="Concept type",
                info="Sets the caption template and every training setting (Train → Advanced).",
                elem_id="ls-concept", scale=2)
            ctx.components["trigger"] = gr.Textbox(
                "TOK", label="Trigger word", info="Put it in your prompts to call up what was learnt.",
                elem_id="ls-trigger", scale=1)
        ctx.components["base_model"] = gr.Dropdown(
            list(ctx.policy.base_models), value=ctx.policy.default_base_model(ctx.cuda), label="Base model",
            info="The models this app offers; tiny-sdxl / tiny-sd are offline demo models.",
            elem_id="ls-base-model", render=False, scale=3)
        with gr.Tabs(elem_id="ls-tabs") as tabs:
            with gr.Tab("Dataset", id="dataset"):
                ds = dataset_tab.build(ctx)
            with gr.Tab("Train", id="train"):
                tr = train_tab.build(ctx)
            with gr.Tab("Generate", id="generate") as gen_tab:
                gen = generate_tab.build(ctx)
            with gr.Tab("Publish", id="publish") as pub_tab:
                pub = publish_tab.build(ctx)
        gen_tab.select(*gen["refresh"], api_visibility="private")
        pub_tab.select(*pub["refresh"], api_visibility="private")

        def on_load(saved, request: gr.Request):
            # The id this browser kept opens its workspace only with the cookie it is bound to (or, for a
            # browser that sends no cookies, when it is bound to none); anything else gets a fresh secret id.
            browser = browser_of(request)
            ok = valid_session_id(saved) and workspaces.exists(saved) and (
                workspaces.held_by(saved, browser) if browser else not workspaces.is_bound(saved))
            sid = saved if ok else workspaces.new_id()
            try:
                workspaces.bind(sid, browser)
            except SessionLimitError as e:  # the operator's --max-sessions
                raise gr.Error(str(e))
            return sid, sid

        load_ev = demo.load(on_load, inputs=[browser_ws], outputs=[ctx.ws_state, browser_ws],
                            api_visibility="private")
        # Each tab refreshes itself from the workspace once the id is known (re-attaches a running training).
        for tab in (ds, tr, gen, pub):
            tab["on_load"](load_ev)
        choices.wire_tabs(ctx, load_ev, tabs, header)  # a reload lands on the open tab; the header where it matters
        choices.wire(ctx, load_ev, {"concept": ctx.components["concept"], "trigger": ctx.components["trigger"],
                                    "base_model": ctx.components["base_model"], **tr["choices"]})

    from starlette.middleware import Middleware

    # No session folder in allowed_paths: Gradio serves only its cache, where ui/file_guard.py puts the copies
    # made for each session; FileGuard refuses every other file and makes every file answer a download.
    guard = Middleware(FileGuard, protected=workspaces.sessions_root, max_upload_bytes=ctx.policy.max_upload_bytes)
    launch_kwargs = dict(
        theme=make_theme(),
        css=CSS + STUDIO_CSS,
        allowed_paths=[],
        max_file_size=ctx.policy.max_upload_bytes,
        app_kwargs={"middleware": [guard, Middleware(BrowserCookie)]},
        footer_links=["api"],
        show_error=True,
    )
    demo.queue(default_concurrency_limit=4)
    demo.ls_context = ctx  # for tests and debugging
    return demo, launch_kwargs
