"""Scoring hook of the SVAMP task (`svamp.yaml`): numeric exact match of the last number."""

from __future__ import annotations

import math


def parse_number(text: str) -> float | None:
    """`"$1,234."` -> 1234.0; None when `text` holds no number (e.g. lm-eval's "[invalid]")."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """`results[0]` is the regex-filtered answer string; 1 when it equals `doc["Answer"]`.

    Equality is up to 1e-6 relative (answers are integers or short decimals).
    """
    pred = parse_number(results[0])
    gold = float(doc["Answer"])
    ok = pred is not None and math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-6)
    return {"exact_match": int(ok)}
