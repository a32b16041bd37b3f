"""The CLI's view of the event stream: a tqdm bar with loss, lr and Prodigy's d*lr, and one line per phase."""
from __future__ import annotations

import sys

from .events import Event, describe_first_step


class CliProgress:
    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.bar = None
        self.loss = None  # the last loss read (every --log_every steps), shown until the next read
        self.val_loss = None  # the last validation loss (--validation_loss_images)
        self.failed = False  # a `failed` event was printed (the CLI then does not print the error again)

    def __call__(self, ev: Event) -> None:
        from tqdm import tqdm

        t = ev.type
        if t == "started":
            for n in ev.notes:
                print(f"note: {n}", file=self.stream)
            self.bar = tqdm(total=ev.total_steps, initial=ev.start_step, desc="training", unit="step",
                            file=self.stream, dynamic_ncols=True)
        elif t == "step" and self.bar is not None:
            self.bar.update(ev.step - self.bar.n)
            post = {"lr": f"{ev.lr:.3g}"}
            if ev.loss is not None:
                self.loss = ev.loss
            if self.loss is not None:
                post["loss"] = f"{self.loss:.4f}"
            if self.val_loss is not None:
                post["val"] = f"{self.val_loss:.4f}"
            if ev.d_lr is not None:
                post["d*lr"] = f"{ev.d_lr:.3g}"
            self.bar.set_postfix(post, refresh=False)
        elif t == "validation_loss":
            self.val_loss = ev.loss
        elif t == "status" and ev.phase == "pick" and ev.total:
            if self.bar is None or self.bar.desc != "pick sweep":  # the sweep gets its own bar
                self.close()
                self.bar = tqdm(total=ev.total, desc="pick sweep", unit="image", file=self.stream,
                                dynamic_ncols=True)
            self.bar.update(ev.current - self.bar.n)
            self.bar.set_postfix_str(ev.message.split(": ", 1)[-1][:60], refresh=False)
        elif t == "picked":
            self.close()
            print(f"pick: {ev.checkpoint} at LoRA scale {ev.scale:g} ({ev.path})\n  why: {ev.why}", file=self.stream)
        elif t == "status":
            msg = f"[{ev.phase}] {ev.message}"
            (self.bar.write(msg) if self.bar is not None else print(msg, file=self.stream))
        elif t == "first_step":
            self._write(describe_first_step(ev))
        elif t == "checkpoint":
            self._write(f"checkpoint saved: {ev.path}")
        elif t == "sample":
            self._write(f"samples at step {ev.step}: {', '.join(ev.images)}")
        elif t == "failed":
            self.failed = True
            self._write(f"error: {ev.error}")

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
