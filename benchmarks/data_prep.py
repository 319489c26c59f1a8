"""Corpus preparation: tokens per split of `pydoc` and first-time versus cached preparation time.

    .venv/bin/python benchmarks/data_prep.py [--dataset pydoc] [--tokenizers byte bpe:4096] [--repeats 5]

Uses a fresh temporary cache directory (REVDEQ_CACHE_DIR is ignored). Library imports (including the
first `AutoTokenizer.from_pretrained`, which imports for seconds) are done before timing, so the times
are those of `prepare_corpus` itself: "first" builds everything into an empty cache (a BPE tokenizer is
trained first), "cached" is the next call, which finds the cache; both are medians over --repeats fresh
caches. Exits 1 if the cache is not at least 10x faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pydoc")
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "bpe:4096"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import datasets  # noqa: F401  (import cost is not preparation cost)

    from revdeq_cli.data import SPLITS, byte_tokenizer, prepare_corpus
    from revdeq_cli.data.tokenizer import load_pretrained_tokenizer

    with tempfile.TemporaryDirectory() as warm:  # the first AutoTokenizer load pays seconds of imports
        byte_tokenizer().save_pretrained(warm)
        load_pretrained_tokenizer(warm, local_only=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="revdeq-bench-cache-") as root:
        for spec in args.tokenizers:
            firsts, cached = [], []
            for repeat in range(args.repeats):  # each repeat: a build into an empty cache, then a cache hit
                cache = Path(root) / f"{spec.replace(':', '-')}-{repeat}"
                start = time.perf_counter()
                corpus = prepare_corpus(args.dataset, tokenizer=spec, cache_dir=cache)
                firsts.append(time.perf_counter() - start)
                start = time.perf_counter()
                again = prepare_corpus(args.dataset, tokenizer=spec, cache_dir=cache)
                cached.append(time.perf_counter() - start)
                assert again.fingerprint == corpus.fingerprint
            rows.append((spec, corpus, statistics.median(firsts), statistics.median(cached)))

    print(f"dataset: {rows[0][1].source}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print()
    header = f"{'tokenizer':<10} {'vocab':>6} " + " ".join(f"{s + ' tokens':>18}" for s in SPLITS)
    header += f" {'bytes/token':>11} {'first (s)':>10} {'cached (s)':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    ok = True
    for spec, corpus, first, cached in rows:
        tokens = {s: len(corpus.splits[s]) for s in SPLITS}
        ratio = sum(corpus.split_bytes.values()) / sum(tokens.values())
        speedup = first / cached
        ok &= speedup >= 10
        print(
            f"{spec:<10} {corpus.vocab_size:>6} "
            + " ".join(f"{tokens[s]:>18,}" for s in SPLITS)
            + f" {ratio:>11.2f} {first:>10.3f} {cached:>10.4f} {speedup:>8.0f}x"
        )
    print()
    print(
        "documents per split: "
        + ", ".join(f"{s} {rows[0][1].split_documents[s]}" for s in SPLITS)
        + "; UTF-8 bytes per split: "
        + ", ".join(f"{s} {rows[0][1].split_bytes[s]:,}" for s in SPLITS)
    )
    print("tokens include one end-of-text token per document")
    if not ok:
        print("FAIL: the cached preparation is not 10x faster than the first", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
