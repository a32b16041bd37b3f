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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from ui import build_app

    demo, launch_kwargs = build_app(root=args.root, max_idle_s=args.max_idle_hours * 3600)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs)


if __name__ == "__main__":
    main()
