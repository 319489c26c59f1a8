"""Does a checkpoint write words? The share of generated words that occur in the training corpus.

    python studies/sample_words.py runs/pydoc-20261129-120000           # revdeq generate's defaults
    python studies/sample_words.py CKPT --temperature 0.6 --seeds 0,1,2,3,4 --max-new-tokens 300

Runs `revdeq generate PROMPT -c CKPT --seed S --max-new-tokens N` (the command a user runs, with its default
sampling unless options are given) for every seed, splits the generated text (prompt excluded) on
whitespace, strips leading/trailing punctuation, keeps the words made of letters only (A-Z, a-z, at least
2 letters), and counts how many of them occur, case-insensitively, among the same kind of words of the
training corpus (`--dataset`, default pydoc: its train split as the byte tokenizer sees it). Prints a table
per seed and the total; exit 0.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_WORD = re.compile(r"^[A-Za-z]{2,}$")
_STRIP = "\"'`.,;:!?()[]{}<>*_-=#/\\|~"


def letter_words(text: str) -> list[str]:
    """Whitespace-separated words, punctuation stripped at both ends, letters only (>= 2), lower-cased."""
    out = []
    for raw in text.split():
        word = raw.strip(_STRIP)
        if _WORD.match(word):
            out.append(word.lower())
    return out


def corpus_words(dataset: str) -> set[str]:
    """The letter-only words of `dataset`'s train split (decoded as the byte tokenizer stores it)."""
    from revdeq_cli.data import prepare_corpus

    corpus = prepare_corpus(dataset, tokenizer="byte", offline=True)
    ids = corpus.splits["train"]
    text = corpus.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)
    return set(letter_words(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="The")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--show", action="store_true", help="print each sample")
    args = p.parse_args(argv)

    known = corpus_words(args.dataset)
    extra = []
    for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p)):
        if value is not None:
            extra += [flag, str(value)]
    total_words = total_known = 0
    print(f"checkpoint {args.checkpoint}; prompt {args.prompt!r}; {args.max_new_tokens} new tokens; "
          f"sampling: {' '.join(extra) or 'revdeq generate defaults'}; corpus {args.dataset} ({len(known):,} words)")
    print("| seed | words | in corpus | share |")
    print("|---:|---:|---:|---:|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        cmd = ["revdeq", "generate", args.prompt, "-c", args.checkpoint, "--seed", str(seed),
               "--max-new-tokens", str(args.max_new_tokens), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"seed {seed}: revdeq generate failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        text = proc.stdout
        text = text[len(args.prompt):] if text.startswith(args.prompt) else text
        words = letter_words(text)
        hits = sum(w in known for w in words)
        total_words += len(words)
        total_known += hits
        print(f"| {seed} | {len(words)} | {hits} | {hits / max(1, len(words)):.0%} |")
        if args.show:
            print(text.strip()[:2000], file=sys.stderr)
    print(f"| all | {total_words} | {total_known} | **{total_known / max(1, total_words):.1%}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
