"""One rank of a torchrun test run (tests/test_multiprocess.py): ``python -m torch.distributed.run ... tests/mp_worker.py
MODE CONFIG.json OUT_DIR``. Trains ``CONFIG`` through ``trainer.train`` and writes ``OUT_DIR/rank<N>.json``.

Modes: ``count`` counts the ``torch.distributed.all_reduce`` calls of every optimizer step (between two
``before-optimizer-step`` fault points); ``nan`` turns one LoRA weight of rank 0 (only) into NaN before step 2's
optimizer step; ``autofit`` gives the ranks different memory budgets (rank 0: plenty, the others: none) and
records the plan each rank's preflight made.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_flush_denormal(True)


def main(mode: str, config_path: str, out_dir: str) -> None:
    from trainer import TrainConfig, train
    from trainer.training.errors import TrainingError

    rank = int(os.environ["RANK"])
    cfg = TrainConfig.from_sources(**json.load(open(config_path)))
    record: dict = {"rank": rank}
    run: list = []  # the Trainer of this rank, once made
    import trainer.training.trainer as tr

    real_init = tr.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        run.append(self)

    tr.Trainer.__init__ = init
    hook = None
    if mode == "count":
        calls = [0]
        real = dist.all_reduce

        def counting(*a, **k):
            calls[0] += 1
            return real(*a, **k)

        dist.all_reduce = counting  # accelerate and trainer.distributed look it up here at call time
        marks: list[int] = []
        tensors: list[int] = []

        def hook(point: str) -> None:
            if point.startswith("before-optimizer-step:"):
                marks.append(calls[0])
                tensors.append(len(run[-1].trainable()))  # the gradients averaged at this step

        record.update(marks=marks, tensors=tensors)
    elif mode == "nan":
        def hook(point: str) -> None:
            if point == "before-optimizer-step:1" and rank == 0:
                with torch.no_grad():
                    run[-1].optimizer.param_groups[0]["params"][0].fill_(float("nan"))
    elif mode == "autofit":
        import trainer.preflight as pf
        import trainer.preflight.plan as plan_mod

        plan_mod.available_memory = lambda: 10 ** 15 if rank == 0 else 1
        real_preflight = pf.preflight

        def preflight(*a, **k):
            plan = real_preflight(*a, **k)
            record["plan"] = {"attempts": len(plan.attempts), "fits": plan.fits, "changes": plan.changes,
                              "gradient_checkpointing": plan.config.gradient_checkpointing}
            return plan

        pf.preflight = preflight
    try:
        result = train(cfg, fault_hook=hook)
        record.update(step=result.step, total=result.total_steps)
    except TrainingError as exc:
        record["error"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
