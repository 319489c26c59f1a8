"""Test-wide settings: never touch the network, keep caches inside the test's temp dirs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: tests are small, several spawn 2-process runs (DDP, torchrun), and on a
# 2-core machine oversubscribed threads make them many times slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # in case torch was imported before this file set OMP_NUM_THREADS


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own revdeq cache dir unless it sets one itself."""
    monkeypatch.setenv("REVDEQ_CACHE_DIR", str(tmp_path_factory.mktemp("revdeq-cache")))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets-cache")))


@pytest.fixture(scope="session", autouse=True)
def _float32_unless_a_test_says():
    """`train.precision: auto` (the default) trains in bf16 on hosts with native bfloat16 (AMX, AVX512-BF16, CUDA
    >= 8.0) and in fp32 elsewhere: in this process tests resolve it as fp32 on every host, so their numbers do not
    depend on the machine. Session-wide, so module- and session-scoped fixtures that train are covered too. The
    tests of `auto` itself patch the probe again (test_precision_hosts.py). Subprocess runs cannot be patched: every
    test that starts one passes `--precision` explicitly."""
    from revdeq_cli.training import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "native_low_precision", lambda device: None)
        yield
