"""Model presets: named sizes for `RevDEQConfig.from_preset(name, **overrides)`.

A preset is a size only; how the model solves and trains is a recipe's business (`revdeq_cli.recipes`: `paper`,
the reference implementation's method, and `equilibrium`, revdeq's). Every preset pads the GPT-2 vocabulary to
50304; pass `vocab_size=` for another tokenizer. `paper` is the paper's language model size: width 768, 12 heads,
MLP 3072, context 448, no biases in attention/MLP (as the earlier PyTorch port, so its checkpoints convert without
loss; docs/recipes.md lists where the reference's block differs). `tiny` (the laptop-CPU preset) has the 128-token
context the default run trains at: a run trains on sequences as long as its model's context unless `--seq-len`
says otherwise, and then the saved model declares the shorter context (see `revdeq_cli.settings`).

| preset | width | heads | MLP  | context | bias |
|--------|-------|-------|------|---------|------|
| tiny   | 128   | 4     | 512  | 128     | yes  |
| small  | 256   | 8     | 1024 | 512     | yes  |
| base   | 512   | 8     | 2048 | 1024    | yes  |
| paper  | 768   | 12    | 3072 | 448     | no   |
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 50304, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512,
             "max_position_embeddings": 128},
    "small": {"vocab_size": 50304, "hidden_size": 256, "num_attention_heads": 8, "intermediate_size": 1024,
              "max_position_embeddings": 512},
    "base": {"vocab_size": 50304, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
             "max_position_embeddings": 1024},
    "paper": {"vocab_size": 50304, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
              "max_position_embeddings": 448, "bias": False},
}
