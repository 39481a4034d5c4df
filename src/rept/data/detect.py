"""Behaviour detectors given as rules: `prefix:TEXT`, `contains:TEXT`, `regex:PATTERN`,
`not-prefix:TEXT` (fires when the answer does NOT start with TEXT, e.g. a refusal)."""

from __future__ import annotations

from rept.errors import ReptError

import re
from dataclasses import dataclass


class DetectorError(ReptError):
    pass


@dataclass(frozen=True)
class Detector:
    rule: str

    def __post_init__(self):
        kind, sep, arg = self.rule.partition(":")
        if not sep or kind not in {"prefix", "contains", "regex", "not-prefix", "not-contains"} or not arg:
            raise DetectorError(f"bad detector rule '{self.rule}': use prefix:TEXT, contains:TEXT, regex:PATTERN, "
                                "not-prefix:TEXT or not-contains:TEXT")
        if kind == "regex":
            try:
                re.compile(arg)
            except re.error as exc:
                raise DetectorError(f"bad regex in detector rule '{self.rule}': {exc}") from None

    def __call__(self, response: str) -> bool:
        kind, _, arg = self.rule.partition(":")
        text = response.strip()
        if kind == "prefix":
            return text.startswith(arg)
        if kind == "not-prefix":
            return not text.startswith(arg)
        if kind == "contains":
            return arg in text
        if kind == "not-contains":
            return arg not in text
        return re.search(arg, text) is not None

    def span(self, response: str) -> tuple[int, int] | None:
        """Character span of `response` that made the rule fire, when the rule names one."""
        kind, _, arg = self.rule.partition(":")
        if kind in {"prefix", "contains"}:
            i = response.find(arg)
            return (i, i + len(arg)) if i >= 0 else None
        if kind == "regex":
            m = re.search(arg, response)
            return m.span() if m else None
        return None
