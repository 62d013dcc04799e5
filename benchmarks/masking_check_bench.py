"""Cost of the decoded cross-check of label masking (`bunny.conversation`), per sample.

Tokenizes `--samples` records (the tiny recipe-1 and recipe-2 records, cycled; Phi-3-style
tiny tokenizer, `phi3` template) and times, in the same run: the whole
`tokenize_conversation` (prompt, ids, offset masking and the cross-check) and the
cross-check alone (decoding each sample's trained runs and comparing them with the answers).
Prints the figures and the share of the total the cross-check takes.

    python benchmarks/masking_check_bench.py --samples 50000
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from bunny.conversation import _decodes_to_answers, _encode, _labels, _render, get_template, tokenize_conversation
from bunny.tiny import make_tiny_assets
from bunny.tiny.tokenizer import build_tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    args = parser.parse_args()
    assets = make_tiny_assets(Path(tempfile.gettempdir()) / "bunny-masking-bench-assets", seed=0)
    records = json.loads(assets.recipe1_data.read_text()) + json.loads(assets.recipe2_data.read_text())
    samples = list(itertools.islice(itertools.cycle(records), args.samples))
    tokenizer = build_tiny_tokenizer()
    template = get_template("phi3")

    started = time.perf_counter()
    tokens = mismatches = 0
    for record in samples:
        sample = tokenize_conversation(record["conversations"], tokenizer, "phi3", "image" in record, 2048)
        tokens += len(sample.input_ids)
        mismatches += sample.mismatch
    total = time.perf_counter() - started

    prepared = []
    for record in samples:
        rendered = _render(record["conversations"], template, "image" in record)
        encoded = _encode(rendered.text, tokenizer, "image" in record)
        prepared.append((encoded, _labels(encoded, rendered), rendered))
    started = time.perf_counter()
    for encoded, labels, rendered in prepared:
        _decodes_to_answers(encoded, labels, rendered, tokenizer, truncated=False)
    check = time.perf_counter() - started

    print(json.dumps({
        "samples": len(samples), "mean_tokens": round(tokens / len(samples), 1), "mismatches": mismatches,
        "tokenize_conversation_s": round(total, 2), "per_sample_us": round(1e6 * total / len(samples), 1),
        "cross_check_s": round(check, 2), "cross_check_per_sample_us": round(1e6 * check / len(samples), 1),
        "cross_check_share": round(check / total, 3),
    }))


if __name__ == "__main__":
    main()
