"""Generate tab: pick a finished run (or upload a LoRA + embeddings), prompt with TOK, get images."""
from __future__ import annotations

import json
import os
import shutil

import gradio as gr

from generation import SCHEDULERS, GenerateRequest, InferenceInputError, request_from_run
from trainer import replace_word
from uploads import safe_filename

from . import jobs as J
from .allowlist import VisitorError, check_base_model
from . import download_view, pick_view

UPLOADED = "(uploaded LoRA files)"


def _path_of(f) -> str:
    return f if isinstance(f, str) else getattr(f, "name", None) or str(f)


def finished_runs(ctx, sid: str) -> list[str]:
    out = []
    d = ctx.workspaces.runs_dir(sid)
    for name in ctx.workspaces.list_runs(sid):
        if os.path.isfile(os.path.join(d, name, "pytorch_lora_weights.safetensors")):
            out.append(name)
    return out


def run_trigger(run_dir) -> str:
    """The trigger word a run was trained with (its config.json), ``TOK`` when unknown."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            abst = json.load(f).get("token_abstraction") or "TOK"
    except (OSError, ValueError, AttributeError):
        return "TOK"
    first = str(abst).split(",")[0].strip()  # the first of a comma list, as the trainer numbers them
    return first or "TOK"


def prompt_hint(trigger: str) -> str:
    return f"`{trigger}` (this run's trigger word) is replaced by the learnt tokens."


def build(ctx) -> dict:
    ws = ctx.ws_state
    with gr.Row():
        run = gr.Dropdown([], label="Trained run", info="Runs of this session that finished (or were stopped and "
                          "exported).", elem_id="ls-gen-run", scale=3)
        refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=90)
    with gr.Accordion("…or use your own LoRA files", open=False):
        with gr.Row():
            lora_file = gr.File(label="LoRA .safetensors", file_types=[".safetensors"], type="filepath", height=90)
            emb_file = gr.File(label="Embeddings _emb.safetensors (optional)", file_types=[".safetensors"],
                               type="filepath", height=90)
            up_base = gr.Dropdown(list(ctx.policy.base_models), value=ctx.policy.default_base_model(ctx.cuda),
                                  label="Base model of the uploaded LoRA")
    prompt = gr.Textbox("a photo of TOK", label="Prompt", info=prompt_hint("TOK"), elem_id="ls-prompt", lines=2)
    prompt_trigger = gr.State("TOK")  # the trigger word the prompt box holds now
    negative = gr.Textbox("", label="Negative prompt", lines=1)
    with gr.Row():
        scheduler = gr.Dropdown(list(SCHEDULERS), value="Euler a", label="Scheduler")
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance")
        lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
    with gr.Row():
        width = gr.Number(0, precision=0, label="Width (0 = model default)")
        height = gr.Number(0, precision=0, label="Height (0 = model default)")
        seed = gr.Number(-1, precision=0, label="Seed (-1 = random)")
        num_images = gr.Slider(1, 8, value=2, step=1, label="Images")
    gen_btn = gr.Button("Generate", variant="primary", elem_id="ls-generate")
    seed_info = gr.Markdown("", elem_id="ls-seed-info")
    gallery = gr.Gallery(label="Images", columns=4, height=340, elem_id="ls-gen-gallery")

    def run_dir_of(run_v, ws_id, request) -> str | None:
        if not run_v or run_v == UPLOADED:
            return None
        d = os.path.join(ctx.workspaces.runs_dir(ctx.sid(ws_id, request)), os.path.basename(run_v))
        return d if os.path.isdir(d) else None

    pick = pick_view.build(ctx, run, lora_scale, run_dir_of)
    download_view.build(ctx, run, run_dir_of)  # the run's files, as this session's own copies

    def refresh(ws_id, request: gr.Request):
        runs = finished_runs(ctx, ctx.sid(ws_id, request))
        return gr.Dropdown(choices=runs + [UPLOADED], value=runs[0] if runs else None)

    def generate(run, lora_file, embeddings_file, lora_base_model, prompt, negative_prompt, scheduler, steps,
                 guidance_scale, lora_scale, width, height, seed, num_images, use_pick, ws_id, request: gr.Request,
                 progress=gr.Progress()):
        run_v, lora_v, emb_v, up_base_v, prompt_v, neg_v, sched_v, steps_v, guid_v, scale_v, w_v, h_v, seed_v, n_v = (
            run, lora_file, embeddings_file, lora_base_model, prompt, negative_prompt, scheduler, steps,
            guidance_scale, lora_scale, width, height, seed, num_images)
        sid = ctx.sid(ws_id, request)
        if ctx.cuda and ctx.jobs.busy():
            # One GPU job at a time: a generation next to a running training would fight it for GPU memory.
            job = ctx.jobs.latest(sid)
            mine = job is not None and job.state in J.ACTIVE
            raise gr.Error("The GPU is busy training" + (" your run" if mine else " a LoRA") +
                           f" ({ctx.jobs.queue_length()} more waiting). Generation opens again when it finishes.")
        common = dict(prompt=prompt_v or "", negative_prompt=neg_v or "", scheduler=sched_v, steps=int(steps_v),
                      guidance_scale=float(guid_v), lora_scale=float(scale_v), num_images=int(n_v),
                      width=int(w_v) if w_v else None, height=int(h_v) if h_v else None,
                      seed=None if seed_v is None or int(seed_v) < 0 else int(seed_v))
        try:
            if run_v and run_v != UPLOADED:
                run_dir = os.path.join(ctx.workspaces.runs_dir(sid), os.path.basename(run_v))
                if not os.path.isdir(run_dir):
                    raise gr.Error(f"No run named '{run_v}' in this session.")
                job = ctx.jobs.latest(sid)
                if job is not None and job.state == J.RUNNING and os.path.realpath(job.run_dir) == \
                        os.path.realpath(run_dir):
                    raise gr.Error("That run is still training; wait for it to finish.")
                req = pick_view.apply_pick(request_from_run(run_dir, **common), run_dir, use_pick)
            elif lora_v:
                base = check_base_model(up_base_v, ctx.policy)
                # Keep the uploaded names: the engine refuses anything but .safetensors by name (a .ckpt renamed
                # here would hide that), and its messages then name the user's own file.
                folder = os.path.join(ctx.workspaces.session_dir(sid), "uploads", ".lora")
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(os.path.join(folder, "emb"), exist_ok=True)
                lp = os.path.join(folder, safe_filename(os.path.basename(_path_of(lora_v))))
                shutil.copyfile(_path_of(lora_v), lp)
                ep = None
                if emb_v:
                    ep = os.path.join(folder, "emb", safe_filename(os.path.basename(_path_of(emb_v))))
                    shutil.copyfile(_path_of(emb_v), ep)
                req = GenerateRequest(base_model=base, lora_path=lp, embeddings_path=ep, **common)
            else:
                raise gr.Error("Pick a trained run, or upload a LoRA .safetensors file.")
            progress(0, desc="Loading the model...")
            res = ctx.engine.get().generate(req, on_progress=lambda s, t: progress((s, t), desc="Denoising",
                                                                                    unit="steps"))
        except (InferenceInputError, VisitorError) as e:
            raise gr.Error(str(e))
        items = [(img, f"seed {s} · {sched_v} · {int(steps_v)} steps · cfg {guid_v} · scale {scale_v}")
                 for img, s in zip(res.images, res.seeds)]
        seeds = ", ".join(str(s) for s in res.seeds)
        return items, f"Seeds used: **{seeds}** (type one into Seed to get the same image again)."

    inputs = [run, lora_file, emb_file, up_base, prompt, negative, scheduler, steps, guidance, lora_scale, width,
              height, seed, num_images, pick["use_pick"], ws]
    gen_btn.click(generate, inputs, [gallery, seed_info], api_name="generate", concurrency_id="gpu",
                  concurrency_limit=1)
    refresh_btn.click(refresh, [ws], [run], api_name="list_runs")

    def follow_trigger(run_v, prompt_v, held, ws_id, request: gr.Request):
        """The prompt and its hint use the chosen run's own trigger word (its old one renamed in the prompt)."""
        d = run_dir_of(run_v, ws_id, request)
        trig = run_trigger(d) if d else "TOK"
        text = (prompt_v or "").strip()
        text = replace_word(text, held or "TOK", trig) if text else f"a photo of {trig}"
        return gr.update(value=text, info=prompt_hint(trig)), trig

    run.change(follow_trigger, [run, prompt, prompt_trigger, ws], [prompt, prompt_trigger], api_visibility="private")

    def on_load(load_ev):
        load_ev.then(refresh, [ws], [run], api_visibility="private")

    return {"on_load": on_load, "refresh": (refresh, [ws], [run])}
