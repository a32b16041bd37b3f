"""The recommendation rule: which checkpoint x LoRA scale to use, from the sweep's scores.

Each cell (checkpoint, scale) has a likeness (mean over all its images) and a prompt fit per held-out prompt
(mean over seeds). The base model (no LoRA, no learnt tokens) rendering the same prompts without the trigger sets
each prompt's reference fit. A cell "keeps the prompt" when, for every held-out prompt, its fit is at least
``FIT_FRACTION`` of the base's (``fit >= base - (1 - FIT_FRACTION) * |base|``, which also reads right for
negative cosines). Among the cells that keep the prompt, the highest likeness wins (ties: the higher prompt fit,
then the lower scale, then the earlier checkpoint). When no cell keeps it, the one with the best worst-prompt
margin is recommended and the "why" says that every cell lost some of the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FIT_FRACTION = 0.85

RULE_TEXT = (f"Recommend the checkpoint and LoRA scale with the highest likeness to the training images among "
             f"those whose prompt fit on every held-out prompt stays at least {FIT_FRACTION:.0%} of the base "
             f"model's on the same prompt without the trigger.")


@dataclass
class Cell:
    checkpoint: str            # e.g. "step-200"
    step: int
    scale: float
    likeness: float
    fit_by_prompt: dict[str, float]
    prompt_fit: float = 0.0    # mean over the held-out prompts (filled by decide)
    margin: float = 0.0        # worst (fit - floor) over the held-out prompts (filled by decide)
    keeps_prompt: bool = False
    extra: dict = field(default_factory=dict)


def floor_of(base_fit: float) -> float:
    """The lowest prompt fit that still counts as keeping the prompt, for a base fit ``base_fit``."""
    return base_fit - (1.0 - FIT_FRACTION) * abs(base_fit)


def decide(cells: list[Cell], base_fit: dict[str, float]) -> tuple[Cell, str]:
    """(the recommended cell, one sentence saying why). ``base_fit`` maps each held-out prompt to the base
    model's fit; every cell must have a fit for each of them."""
    if not cells:
        raise ValueError("the sweep has no cells to choose from (no checkpoint was kept)")
    if not base_fit:
        raise ValueError("the rule needs at least one held-out prompt with a base prompt fit")
    for c in cells:
        missing = [p for p in base_fit if p not in c.fit_by_prompt]
        if missing:
            raise ValueError(f"cell {c.checkpoint} x {c.scale} has no prompt fit for {missing}")
        c.prompt_fit = sum(c.fit_by_prompt[p] for p in base_fit) / len(base_fit)
        c.margin = min(c.fit_by_prompt[p] - floor_of(b) for p, b in base_fit.items())
        c.keeps_prompt = c.margin >= 0
    kept = [c for c in cells if c.keeps_prompt]
    if kept:
        best = max(kept, key=lambda c: (c.likeness, c.prompt_fit, -c.scale, -c.step))
        runner = [c for c in cells if c.likeness > best.likeness]
        why = (f"{best.checkpoint} at scale {best.scale:g} has the highest likeness ({best.likeness:.3f}) of the "
               f"{len(kept)} of {len(cells)} settings that keep the prompt (mean fit {best.prompt_fit:.3f})")
        if runner:
            top = max(runner, key=lambda c: c.likeness)
            worst = min(base_fit, key=lambda p: top.fit_by_prompt[p] - floor_of(base_fit[p]))
            why += (f"; {top.checkpoint} at scale {top.scale:g} looks more like the images ({top.likeness:.3f}) "
                    f"but its fit on '{worst}' fell to {top.fit_by_prompt[worst]:.3f}, below the floor "
                    f"{floor_of(base_fit[worst]):.3f}")
        return best, why + "."
    best = max(cells, key=lambda c: (c.margin, c.likeness, -c.scale, -c.step))
    return best, (f"no setting keeps every held-out prompt at {FIT_FRACTION:.0%} of the base model's fit, so "
                  f"{best.checkpoint} at scale {best.scale:g} is recommended as the one that loses the least of "
                  f"the prompt (likeness {best.likeness:.3f}); consider fewer steps or a lower scale.")
