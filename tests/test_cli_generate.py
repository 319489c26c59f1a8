"""`revdeq generate`: prompt sources, sampling options, streaming and statistics, default checkpoint."""

from __future__ import annotations

import re

import pytest
from cli_helpers import invoke, one_error_line, run_cli, trained_run

STATS = re.compile(r"\[sample (\d+)\] (\d+) tokens in [\d.]+s: [\d.]+ tokens/s, ([\d.]+) solver steps/token, "
                   r"peak memory [\d.]+ \w+ \(.+\); seed (\d+), (cache|no cache)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def _stats(stderr: str) -> list[tuple[int, int, float, int, str]]:
    return [(int(a), int(b), float(c), int(d), e) for a, b, c, d, e in STATS.findall(stderr)]


def test_greedy_generation_streams_the_prompt_and_continuation(run):
    result = invoke("generate", "def main(", "-c", run, "--temperature", "0", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def main(")
    [(sample, tokens, steps, _, cache)] = _stats(result.stderr)
    assert (sample, tokens, steps, cache) == (1, 12, 8.0, "cache")  # the preset's 8 inference steps
    again = invoke("generate", "def main(", "-c", run, "--temperature", "0", "--max-new-tokens", "12", "--no-cache")
    assert again.stdout == result.stdout  # greedy: the cache changes the cost, not the text
    assert _stats(again.stderr)[0][4] == "no cache"


def test_seed_makes_sampling_repeatable(run):
    args = ("generate", "x = ", "-c", run, "--max-new-tokens", "16", "--top-k", "5", "--top-p", "0.9",
            "--repetition-penalty", "1.2", "--temperature", "1.5")
    first, second = invoke(*args, "--seed", "3"), invoke(*args, "--seed", "3")
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and _stats(first.stderr)[0][3] == 3


def test_num_samples(run):
    result = invoke("generate", "a", "-c", run, "--num-samples", "2", "--max-new-tokens", "4", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert "--- sample 1/2 ---" in result.stdout and "--- sample 2/2 ---" in result.stdout
    assert [s[0] for s in _stats(result.stderr)] == [1, 2]


def test_prompt_from_stdin_and_file(run, tmp_path):
    piped = invoke("generate", "-c", run, "--max-new-tokens", "3", "--temperature", "0", input="import os\n")
    assert piped.exit_code == 0, piped.output
    assert piped.stdout.startswith("import os\n")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os\n")
    from_file = invoke("generate", "-c", run, "--max-new-tokens", "3", "--temperature", "0", "--prompt-file", prompt)
    assert from_file.stdout == piped.stdout


def test_max_length_alias_counts_the_prompt(run):
    # byte tokenizer: "hello" is 5 tokens, so a total length of 12 leaves 7 new tokens
    result = invoke("generate", "hello", "-c", run, "--max_length", "12", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert _stats(result.stderr)[0][1] == 7
    too_short = invoke("generate", "hello", "-c", run, "--max_length", "5")
    assert too_short.exit_code == 2
    one_error_line(too_short.stderr, "--max_length")


def test_default_checkpoint_is_the_newest_under_runs(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = invoke("generate", "x")
    assert missing.exit_code == 2
    one_error_line(missing.stderr, "runs", "no checkpoint", "--checkpoint")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine").symlink_to(run)
    result = invoke("generate", "x", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert re.search(r"checkpoint: runs/mine/\S+ \(newest under runs/\)", result.stderr)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["x", "--prompt-file", "p.txt"], "not both"),
        (["--prompt-file", "does-not-exist.txt"], "does-not-exist.txt"),
        (["x", "--max-new-tokens", "3", "--max_length", "9"], "not both"),
    ],
)
def test_bad_arguments(run, args, fragment):
    result = invoke("generate", "-c", run, *args)
    assert result.exit_code == 2
    one_error_line(result.stderr, fragment)


def test_bad_checkpoint_paths(tmp_path):
    result = invoke("generate", "x", "-c", tmp_path / "nope")
    assert result.exit_code == 2
    one_error_line(result.stderr, str(tmp_path / "nope"))
    (tmp_path / "checkpoint-000001").mkdir()
    (tmp_path / "checkpoint-000001" / "config.json").write_text("{}")
    result = invoke("generate", "x", "-c", tmp_path)
    assert result.exit_code == 2
    one_error_line(result.stderr, "no checkpoint")


def test_subprocess(run, tmp_path):
    ok = run_cli("generate", "-c", run, "--max-new-tokens", "5", "--temperature", "0", input="Hello")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Hello") and _stats(ok.stderr)[0][1] == 5
    bad = run_cli("generate", "x", cwd=tmp_path)
    assert bad.returncode == 2
    one_error_line(bad.stderr, "no checkpoint")


def test_generation_past_the_context_crops_continues_and_says_so_once(run):
    # The session's run trains 32-token sequences, so its model declares a 32-token context.
    args = ("generate", "def main(", "-c", run, "--temperature", "0", "--max-new-tokens", "45")
    cached = invoke(*args, "--num-samples", "2")
    assert cached.exit_code == 0, cached.output
    assert [s[1] for s in _stats(cached.stderr)] == [45, 45]  # --max-new-tokens honoured, past the context
    assert cached.stderr.count("past the model's context (32 tokens)") == 1  # once per command
    uncached = invoke(*args, "--num-samples", "2", "--no-cache")
    assert uncached.exit_code == 0, uncached.output
    assert uncached.stdout == cached.stdout  # greedy: same tokens with and without the cache
    first = cached.stdout.split("--- sample 2/2 ---")[0].removeprefix("--- sample 1/2 ---\n")
    assert first.startswith("def main(") and first.count("def main(") == 1  # the prompt once, then the text
    assert "past the model's context" not in invoke("generate", "def main(", "-c", run, "--temperature", "0",
                                                    "--max-new-tokens", "10").stderr


ADAPTIVE = re.compile(r"([\d.]+) solver steps/token \(max (\d+) of (\d+), tol ([\d.e-]+)\), peak memory .*; seed \d+, "
                      r"(cache|no cache)")


def test_tol_and_solver_steps_set_adaptive_depth_cached_and_not(run):
    """--solver-steps 16 --tol 0.3: each token stops at its own residual (fewer steps than 16 on average);
    the cache reproduces the full recomputation, so the text and the steps per token are the same."""
    args = ("generate", "def main(", "-c", run, "--temperature", "0", "--max-new-tokens", "10", "--solver-steps", "16")
    cached = invoke(*args, "--tol", "0.3")
    uncached = invoke(*args, "--tol", "0.3", "--no-cache")
    assert cached.exit_code == 0 and uncached.exit_code == 0, cached.output + uncached.output
    [(mean, most, limit, tol, mode)] = ADAPTIVE.findall(cached.stderr)
    assert (limit, tol, mode) == ("16", "0.3", "cache")
    assert 1 <= float(mean) < 16 and int(most) <= 16
    [(mean2, most2, *_rest, mode2)] = ADAPTIVE.findall(uncached.stderr)
    assert (mean2, most2, mode2) == (mean, most, "no cache")
    assert cached.stdout == uncached.stdout
    fixed = invoke(*args)
    [(_, _, steps, _, _)] = _stats(fixed.stderr)
    assert steps == 16.0  # no --tol: every token runs --solver-steps
    zero = invoke(*args[:-1], "0")  # --solver-steps 0: z0 itself, with the cache too
    assert zero.exit_code == 0, zero.output
    assert _stats(zero.stderr)[0][2] == 0.0


@pytest.mark.parametrize("value", ["0", "-0.5", "nan"])
def test_a_bad_tol_is_one_line_exit_2(run, value):
    result = invoke("generate", "x", "-c", run, "--tol", value, "--max-new-tokens", "2")
    assert result.exit_code == 2
    one_error_line(result.stderr, "--tol")
