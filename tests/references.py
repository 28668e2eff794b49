"""Independent references shared by several test modules (no pipeline code inside)."""

from __future__ import annotations

import numpy as np


def reference_windows(docs: list[str], tok, seq_len: int) -> np.ndarray:
    """Per-document encode (no special tokens) + EOS, concatenated, cut into windows of
    `seq_len`, the incomplete tail dropped: [n, seq_len] int64."""
    stream: list[int] = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    n = len(stream) // seq_len
    return np.asarray(stream[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
