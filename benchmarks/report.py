"""Output shared by the micro-benchmarks."""

from __future__ import annotations


def tee(path: str):
    """A ``say(line)`` that prints the line and writes it to ``path`` (created anew), flushed at
    once, so that a run cut short leaves every line it printed."""
    out = open(path, "w")

    def say(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    return say
