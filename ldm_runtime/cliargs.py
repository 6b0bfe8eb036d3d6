"""What the ``ldm`` subcommands share on the command line: one-line errors, image sizes, engine options.

``export`` and ``training`` import this module too; it imports nothing outside the standard library.
"""
from __future__ import annotations

import argparse
from typing import Any


class UsageError(Exception):
    """A bad command line: the command prints it as one line on stderr and exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise ``UsageError`` instead of printing the usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def one_line(e: BaseException) -> str:
    """An exception's message on one line, for a command's one-line errors (engine errors often span several)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def parse_size(text: str) -> tuple[int, int]:
    """``"HEIGHTxWIDTH"`` or ``"SIDE"`` (a square) in pixels -> (height, width); for ``type=``."""
    h, _, w = text.strip().lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH in pixels or one number for a square (e.g. 512x768 or 512), got {text!r}") from None


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """Comma-separated sizes, each as ``parse_size`` reads it: ``"192,256x384"`` -> ((192, 192), (256, 384))."""
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def parse_engine_options(items: list[str]) -> dict[str, Any]:
    """["cpu_variant=false", "threads=2", ...] -> {"cpu_variant": False, "threads": 2, ...}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--engine-option expects KEY=VALUE, got {item!r}")
        low = value.lower()
        out[key] = (True if low in ("true", "yes") else False if low in ("false", "no")
                    else int(value) if value.isdigit() else value)
    return out
