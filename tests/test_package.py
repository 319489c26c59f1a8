"""Package-level promises: Auto-class registration on `import revdeq_cli`, and a CLI that starts light."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_then_transformers_registers_auto_classes():
    out = _run(
        "import revdeq_cli\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "cfg = AutoConfig.for_model('revdeq', vocab_size=32, hidden_size=16, num_attention_heads=2,"
        " intermediate_size=32, max_position_embeddings=8)\n"
        "print(type(AutoModelForCausalLM.from_config(cfg)).__name__)"
    )
    assert out == "RevDEQForCausalLM"


def test_transformers_then_import_registers_auto_classes():
    out = _run("import transformers, revdeq_cli\nfrom transformers import AutoConfig\n"
               "print(type(AutoConfig.for_model('revdeq')).__name__)")
    assert out == "RevDEQConfig"


def test_cli_import_loads_no_heavy_library():
    out = _run("import sys, revdeq_cli.cli.app\n"
               "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    assert out == "[]"
