"""Model presets: named sizes for `RevDEQConfig.from_preset(name, **overrides)`.

All presets are Reversible DEQs (beta 0.5, tol 1e-3, 4 solver steps: the paper's language setting; `tiny` 2
steps) started at the input injection (`init_state="input"`: z0 = y0 = x) with the GPT-2 vocabulary padded to
50304; pass `vocab_size=` for another tokenizer. The start and tiny's 2 steps come from the recipe study
(`benchmarks/recipe.py`, README "Training recipe"): on pydoc at the tiny width, z0 = x reached validation
perplexity 13.2 at 300 steps where z0 = 0 reached 17.3, and 2 steps learned as well per step as 4 (better at
1200 steps) at about half the cost. The config class itself keeps the paper's z0 = 0 as its default, so a
config.json written before the field existed loads as the model it was. `paper` is the paper's language
model: width 768, 12 heads, MLP 3072, context 448, no biases in attention/MLP (as the earlier PyTorch port,
so its checkpoints convert without loss). `tiny` (the laptop-CPU preset) has the 128-token context the
default recipe trains at: a run trains on sequences as long as its model's context unless `--seq-len` says
otherwise, and then the saved model declares the shorter context (see `revdeq_cli.settings`).

Every preset trains an equilibrium model (`EQUILIBRIUM`, from `benchmarks/equilibrium.py`, README "An
equilibrium model"): the block's skip carries the input injection (`block_skip="input"`), each training batch
first runs a Poisson-lognormal number of solver steps without a graph (mean 6, at most 24) and then its
differentiated steps, a fixed-point penalty of 2 on the final state's worst 10% of positions, its weight
ramped in over the first 20% of the run, and the cross-entropy read at f(z_N) as well as at z_N (the readout
trained one step past the solver's output, at the cost of the output head); eval mode and generation read the
reversible pair's midpoint (y_N + z_N) / 2 (`inference_readout`). Unset `inference_max_steps` is then the
training depth: 2 + 6 = 8 steps for tiny (the study's smallest step count within 1% of its best), 10 for the others
(not measured at their sizes).

| preset | width | heads | MLP  | context | differentiated steps | inference steps |
|--------|-------|-------|------|---------|----------------------|-----------------|
| tiny   | 128   | 4     | 512  | 128     | 2                    | 8               |
| small  | 256   | 8     | 1024 | 512     | 4                    | 10              |
| base   | 512   | 8     | 2048 | 1024    | 4                    | 10              |
| paper  | 768   | 12    | 3072 | 448     | 4                    | 10              |
"""

from __future__ import annotations

from typing import Any

FIXED_POINT_PENALTY = 2.0
FIXED_POINT_PENALTY_TAIL = 0.1
PENALTY_RAMP = 0.2
NEXT_ITERATE_LOSS = 1.0
INFERENCE_READOUT = "midpoint"

# The equilibrium recipe (benchmarks/equilibrium.py, README "An equilibrium model"): the block's skip carries the
# input injection (f = x + a + m, a contraction at initialisation), every training batch first runs a
# Poisson-lognormal number of solver steps (mean 6, at most 24) without a graph, then the differentiated steps,
# and the fixed-point penalty is averaged over the worst 10% of positions (the few that orbit decide the max
# residual) and ramped in over the first 20% of the run (at full weight from the start it can keep a run from
# training: round 10's seed 3), and the cross-entropy is also read at f(z_N), one step past the solver's output
# (round 11: the readout learns the states past the trained depth; 5.30 -> 5.08 at 8 steps on the study's seed 0,
# with the penalty at 1 instead of 0.3, where the extra cross-entropy had halved its relative weight; round 12: at 2,
# the largest residual at 32 steps <= 2e-2 on 4 seeds of 4, 0.0014 to 0.018, at +0.7% perplexity). Eval mode and
# generation read the reversible pair's midpoint (y_N + z_N) / 2 (round 12: the windows whose residual stalled at
# 32 steps had settled on a 2-cycle of f, y = f(z), z = f(y), which the midpoint straddles; training reads z_N,
# where the penalty keeps such cycles rare).
EQUILIBRIUM: dict[str, Any] = {"block_skip": "input", "train_detached_steps": "poisson-lognormal:6:24",
                               "fixed_point_penalty": FIXED_POINT_PENALTY,
                               "fixed_point_penalty_tail": FIXED_POINT_PENALTY_TAIL, "penalty_ramp": PENALTY_RAMP,
                               "next_iterate_loss": NEXT_ITERATE_LOSS, "inference_readout": INFERENCE_READOUT}
_SOLVER: dict[str, Any] = {"solver": "reversible", "adjoint": "reversible", "beta": 0.5, "tol": 1e-3, "max_steps": 4,
                           "init_state": "input", **EQUILIBRIUM}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 50304, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512,
             "max_position_embeddings": 128, **_SOLVER, "max_steps": 2},
    "small": {"vocab_size": 50304, "hidden_size": 256, "num_attention_heads": 8, "intermediate_size": 1024,
              "max_position_embeddings": 512, **_SOLVER},
    "base": {"vocab_size": 50304, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
             "max_position_embeddings": 1024, **_SOLVER},
    "paper": {"vocab_size": 50304, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
              "max_position_embeddings": 448, "bias": False, **_SOLVER},
}
