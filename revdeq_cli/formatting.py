"""Numbers as people read them (a leaf helper: imports nothing of revdeq_cli)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """`512 B`, `100 KiB`, `1.5 MiB`, `2.0 GiB` (binary units; GiB is the largest)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
