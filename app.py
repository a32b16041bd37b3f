"""LoRA studio: a few photos in, a Stable Diffusion LoRA out, in the browser.

    python app.py                      # http://127.0.0.1:7860
    python app.py --share              # a public link (Colab)
    python app.py --host 0.0.0.0 --port 7860 --root outputs

All the work lives in ``ui/`` (the tabs), ``trainer/`` and ``captioning/``; this file only parses flags and launches.
"""
from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA studio web app")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="Interface to listen on (0.0.0.0 for every interface; a Space sets GRADIO_SERVER_NAME).")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="Create a public gradio.live link (e.g. on Colab).")
    p.add_argument("--root", default=os.environ.get("LORA_STUDIO_ROOT", "outputs"),
                   help="Folder holding the per-session workspaces (uploads and runs).")
    p.add_argument("--max-idle-hours", type=float, default=6.0,
                   help="Delete the uploads of sessions idle longer than this (finished runs are kept).")
    from ui.allowlist import DEFAULT_BASE_MODELS, DEFAULT_CAPTION_MODELS, Policy

    d = Policy()
    p.add_argument("--base-models", default=os.environ.get("LORA_STUDIO_BASE_MODELS", ",".join(DEFAULT_BASE_MODELS)),
                   help="Comma list of the base models visitors may pick (Hub ids, tiny-sdxl / tiny-sd, or local "
                        "folders the operator trusts).")
    p.add_argument("--caption-models",
                   default=os.environ.get("LORA_STUDIO_CAPTION_MODELS", ",".join(DEFAULT_CAPTION_MODELS)),
                   help="Comma list of the captioning models visitors may pick (tiny-blip is the offline demo).")
    p.add_argument("--max-steps", type=int, default=d.max_train_steps,
                   help="Most optimizer steps one visitor's run may train.")
    p.add_argument("--max-resolution", type=int, default=d.max_resolution,
                   help="Highest training resolution (pixels) a visitor may ask for.")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions,
                   help="Most workspaces (browser sessions active within --max-idle-hours) at once; a new visitor "
                        "beyond it is told to come back later.")
    p.add_argument("--max-runs-per-session", type=int, default=d.max_runs_per_session,
                   help="Most runs one session may have queued or running at once.")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                   help="Largest upload request (all its files together), in MB; larger ones are refused unread.")
    p.add_argument("--max-upload-files", type=int, default=d.max_upload_files,
                   help="Most files one upload may carry.")
    p.add_argument("--max-images", type=int, default=d.max_dataset_images,
                   help="Most images one session's dataset may hold.")
    return p.parse_args(argv)


def policy_of(args):
    """The operator's choices for visitors (ui/allowlist.py Policy) from the flags."""
    from ui.allowlist import Policy

    def names(text: str) -> tuple[str, ...]:
        out = tuple(n.strip() for n in text.split(",") if n.strip())
        if not out:
            raise SystemExit("error: a model list flag is empty: give at least one model id")
        return out

    return Policy(base_models=names(args.base_models), caption_models=names(args.caption_models),
                  max_train_steps=args.max_steps, max_resolution=args.max_resolution,
                  max_upload_mb=args.max_upload_mb, max_upload_files=args.max_upload_files,
                  max_dataset_images=args.max_images,
                  max_sessions=args.max_sessions, max_runs_per_session=args.max_runs_per_session)


def main(argv=None):
    args = parse_args(argv)
    from ui import build_app

    demo, launch_kwargs = build_app(root=args.root, max_idle_s=args.max_idle_hours * 3600, policy=policy_of(args),
                                    start_jobs=False)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **launch_kwargs)
    demo.ls_context.jobs.start()  # jobs restored from the queue train once the server answers
    demo.block_thread()


if __name__ == "__main__":
    main()
