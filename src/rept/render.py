"""Terminal output for traced queries."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table
from rich.text import Text

HIGHLIGHT = "bold reverse yellow"   # the style of a highlighted phrase (or word)
SHOW_PHRASES = 3                    # phrases highlighted and listed per row with --tokens
EXCERPT_WIDTH = 360                 # a row text longer than this is cut to windows around its phrases
CONTEXT = 60                        # characters of context kept on each side of a phrase


def one_line(text: str, width: int = 110) -> str:
    """`text` on one line, at most `width` characters: cut at a word boundary, with "…" for the cut."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    cut = flat.rfind(" ", width // 2, width)  # a word boundary in the second half, else mid-word
    return flat[: cut if cut > 0 else width - 1].rstrip() + "…"


def _tidy(piece: str) -> str:
    """Runs of spaces/tabs to one space, blank lines to one line break (for a table cell)."""
    return re.sub(r"[ \t\r\f\v]+", " ", re.sub(r"\s*\n\s*", "\n", piece))


def highlighted(text: str, words: list[dict], top: int = 3) -> Text:
    """`text` with its `top` highest-scoring words (or phrases) in reverse video."""
    out = Text(text)
    for w in sorted(words, key=lambda w: -w["score"])[:top]:
        out.stylize(HIGHLIGHT, w["start"], w["end"])
    return out


def _windows(text: str, spans: list[tuple[int, int]], width: int, context: int) -> list[tuple[int, int]]:
    """The parts of `text` to show: all of it when it is at most `width` characters; otherwise
    `context` characters around each span (cut at whitespace, overlapping windows merged), or
    the first `width` characters when there is no span."""
    n = len(text)
    if n <= width:
        return [(0, n)]
    if not spans:
        cut = text.rfind(" ", width // 2, width)
        return [(0, cut if cut > 0 else width)]
    windows = []
    for a, b in sorted(spans):
        b = min(b, a + width)                       # a very long phrase shows its first `width` characters
        lo, hi = max(0, a - context), min(n, b + context)
        if lo > 0:                                  # start after a whitespace, not inside a word
            m = re.search(r"\s", text[lo:a])
            lo = lo + m.end() if m else a
        if hi < n:                                  # end at a whitespace
            cut = max(text.rfind(" ", b, hi), text.rfind("\n", b, hi))
            hi = cut if cut >= b else b
        if windows and lo <= windows[-1][1] + 8:
            windows[-1] = (windows[-1][0], max(windows[-1][1], hi))
        else:
            windows.append((lo, hi))
    return windows


def excerpt(text: str, spans: list[tuple[int, int]], width: int = EXCERPT_WIDTH, context: int = CONTEXT) -> Text:
    """`text` (whitespace tidied) with the character spans `spans` highlighted; a text longer
    than `width` keeps only windows of `context` characters around the spans, joined by "…"."""
    out = Text()
    windows = _windows(text, spans, width, context)
    for i, (lo, hi) in enumerate(windows):
        if i or lo > 0:
            out.append(" … " if i else "… ", style="dim")
        # cut the window at span edges so each part is tidied on its own and keeps its style
        marks = sorted({lo, hi} | {min(max(x, lo), hi) for s in spans for x in s})
        for a, b in zip(marks, marks[1:]):
            if b > a:
                lit = any(s0 <= a and b <= s1 for s0, s1 in spans)
                out.append(_tidy(text[a:b]), style=HIGHLIGHT if lit else "")
    if windows and windows[-1][1] < len(text):
        out.append(" …", style="dim")
    return out


def scored_text(hit, top: int = SHOW_PHRASES) -> Text:
    """A row's text with its top phrases highlighted, then the phrases listed with their scores.
    Falls back to the top words when the hit has word scores but no phrases."""
    phrases = hit.phrases if hit.phrases is not None else sorted(hit.words or [], key=lambda w: -w["score"])
    shown = phrases[:top]
    out = excerpt(hit.text, [(p["start"], p["end"]) for p in shown])
    out.append("\n")
    if not shown:
        out.append("no word scores above 0", style="dim italic")
        return out
    out.append("phrases: " if hit.phrases is not None else "words: ", style="dim")
    for i, p in enumerate(shown):
        if i:
            out.append("  ")
        out.append(f"“{one_line(p['text'], 40)}”", style="bold")
        out.append(f" {p['score']:.3f}", style="cyan")
    return out


def print_results(results, show_words: bool = False, console: Console | None = None,
                  token_layer: int | None = None) -> None:
    """A table of the top rows per query. With `show_words`, rows that carry word scores show
    their top phrases highlighted in the text and listed with their scores; `token_layer` (the
    hidden_states index the word scores were taken at) goes in the table's caption."""
    console = console or Console()
    for qi, result in enumerate(results, 1):
        q = result.query
        console.print(f"[bold]query {qi}[/] prompt: {one_line(q.prompt)!r}")
        console.print(f"        response: {one_line(q.response)!r}")
        if q.instead is not None:
            console.print(f"         instead: {one_line(q.instead)!r}")
        caption = None
        if show_words:
            caption = (f"top {SHOW_PHRASES} phrases highlighted (adjacent words scoring ≥ half the row's best word)"
                       + (f"; word scores at layer {token_layer}" if token_layer is not None else ""))
        table = Table(show_lines=show_words, caption=caption)
        for col, kw in (("rank", {"justify": "right"}), ("score", {"justify": "right"}), ("row", {"justify": "right"}),
                        ("label", {}), ("text", {"overflow": "fold"})):
            table.add_column(col, **kw)
        for rank, hit in enumerate(result.hits, 1):
            text = scored_text(hit) if show_words and hit.words is not None else one_line(hit.text)
            table.add_row(str(rank), f"{hit.score:.4f}", str(hit.row), str(hit.label), text)
        console.print(table)
