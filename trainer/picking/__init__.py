"""The picker: which checkpoint and LoRA scale of a finished run to use.

- ``scorer``: CLIP likeness (to the training images) and prompt fit (to the prompt without the trigger);
- ``tiny_clip``: ``tiny-clip``, an offline random-weight CLIP for tests and the demo;
- ``rule``: the recommendation rule (``RULE_TEXT``) and its "why";
- ``sweep``: checkpoints x scales x prompts x seeds through the Generate engine -> ``pick.json`` + grid;
- ``record``: ``pick.json`` and ``load_pick``; ``cli``: ``python -m trainer pick RUN``.
"""
from .record import PICK_FILE, Pick, PickError, load_pick
from .rule import FIT_FRACTION, RULE_TEXT, Cell, decide
from .sweep import SweepSettings, run_sweep

__all__ = ["PICK_FILE", "Pick", "PickError", "load_pick", "FIT_FRACTION", "RULE_TEXT", "Cell", "decide",
           "SweepSettings", "run_sweep"]
