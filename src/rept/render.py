"""Terminal output for traced queries."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _one_line(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def highlighted(text: str, words: list[dict], top: int = 3) -> Text:
    """`text` with its `top` highest-scoring words (or phrases) in reverse video."""
    out = Text(text)
    for w in sorted(words, key=lambda w: -w["score"])[:top]:
        out.stylize("bold reverse yellow", w["start"], w["end"])
    return out


def print_results(results, show_words: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    for qi, result in enumerate(results, 1):
        q = result.query
        console.print(f"[bold]query {qi}[/] prompt: {_one_line(q.prompt)!r}")
        console.print(f"        response: {_one_line(q.response)!r}")
        table = Table(show_lines=show_words)
        for col, kw in (("rank", {"justify": "right"}), ("score", {"justify": "right"}), ("row", {"justify": "right"}),
                        ("label", {}), ("text", {"overflow": "fold"})):
            table.add_column(col, **kw)
        for rank, hit in enumerate(result.hits, 1):
            text = highlighted(hit.text, hit.words) if show_words and hit.words else _one_line(hit.text)
            table.add_row(str(rank), f"{hit.score:.4f}", str(hit.row), str(hit.label), text)
        console.print(table)
