"""How the command line talks: ``--help`` grouped by topic with defaults and examples, a parse error that says
the fix first (not after the whole usage), and the libraries' known noise kept off the terminal.

``trainer/cli.py`` builds the flags; this module only shapes what the user reads.
"""
from __future__ import annotations

import argparse
import io
import logging
import re
import sys
from dataclasses import MISSING
from enum import Enum

# The option groups of TrainConfig fields (their ``group`` metadata), in the order --help shows them.
GROUPS = [
    ("model", "Model"),
    ("data", "Data"),
    ("text", "Pivotal tuning (new tokens) and the text encoders"),
    ("prior", "Prior preservation"),
    ("lora", "LoRA"),
    ("optim", "Optimizer"),
    ("schedule", "Schedule and precision"),
    ("output", "Output, checkpoints and samples"),
    ("general", "General"),
]
COMPAT_TITLE = "Compatibility (flags of diffusers' script, accepted and ignored)"

EXAMPLES = """examples:
  # a face LoRA on SDXL from a folder of photos (captions from .txt files or metadata.jsonl)
  python -m trainer --preset face --instance_data_dir ./photos --token_abstraction TOK --output_dir outputs/me

  # a quick offline try on the tiny demo model, 40 steps, samples every 20
  python -m trainer --pretrained_model_name_or_path tiny-sdxl --instance_data_dir ./photos \\
      --max_train_steps 40 --validation_steps 20 --output_dir outputs/demo

Values come from: the defaults below < --preset < --config file < flags. Booleans take --flag, or true/false.
"""


class StudioParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors put the message (and its "did you mean") first and skip the long usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n(run `{self.prog} --help` for every flag, grouped by topic)\n")


def default_text(field) -> str:
    """' (default: X)' for a dataclass field, '' when it has none worth showing."""
    if field.default is not MISSING:
        value = field.default
    elif field.default_factory is not MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return ""
    if isinstance(value, Enum):
        value = value.value
    if value is None or value == "" or value == [] or value == {}:
        return ""
    return f" (default: {value})"


def field_help(field) -> str:
    """The flag's help: the field's own text and its default. '%' is escaped for argparse."""
    text = (field.metadata.get("help", "") or "") + default_text(field)
    return text.replace("%", "%%")


def make_groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One argparse group per option group, created in the help's order."""
    return {key: parser.add_argument_group(title) for key, title in GROUPS}


# ----- library noise ----------------------------------------------------------------------------------------------
# Messages of the libraries that say nothing the user can act on here (each checked in a real CLI run).
NOISE = [
    re.compile(r"should be kept in float32"),              # diffusers: a VAE cast with .to(dtype)
    re.compile(r"^Using decoupled weight decay$"),         # prodigyopt prints it on every optimizer built
    re.compile(r"requires torchvision \(not installed\)"),  # transformers: the PIL image processor is used
    re.compile(r"[Ii]nstall torchvision"),
]


def is_noise(text: str) -> bool:
    return any(p.search(text.strip()) for p in NOISE)


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not is_noise(record.getMessage())
        except Exception:
            return True


class FilteredStream(io.TextIOBase):
    """A text stream that drops whole lines matching :data:`NOISE` and passes everything else through."""

    def __init__(self, stream):
        self.stream = stream
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if not is_noise(line):
                self.stream.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        if self._buf and not is_noise(self._buf):
            self.stream.write(self._buf)
        self._buf = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return getattr(self.stream, "isatty", lambda: False)()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


_NOISY_LOGGERS = ("diffusers", "transformers", "diffusers.models.modeling_utils", "transformers.utils.import_utils")


def quiet_libraries() -> None:
    """Filters the known noise from the libraries' loggers (records are filtered where they are logged, so the
    emitting modules' own loggers get the filter) and from plain ``print`` to stdout."""
    flt = NoiseFilter()
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(flt)
    for name in ("diffusers", "transformers"):
        for h in logging.getLogger(name).handlers:
            h.addFilter(flt)
    if not isinstance(sys.stdout, FilteredStream):
        sys.stdout = FilteredStream(sys.stdout)
