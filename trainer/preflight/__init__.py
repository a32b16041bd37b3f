"""Preflight (``--auto_fit``): measure a few real steps, predict the whole run, and make the settings fit in
memory. ``memory`` holds the probes, ``measure`` measures one run, ``plan`` chooses the fixes."""
from .measure import Measurement, measure_run, summarize_events
from .memory import available_memory, fmt_bytes, fmt_seconds
from .plan import FitPlan, next_fix, planned_total_steps, preflight

__all__ = ["FitPlan", "Measurement", "preflight", "measure_run", "summarize_events", "next_fix",
           "planned_total_steps", "available_memory", "fmt_bytes", "fmt_seconds"]
