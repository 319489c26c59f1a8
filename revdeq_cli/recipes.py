"""Training recipes by name: how a model solves and trains, apart from its size (`model/presets.py`).

    revdeq train --recipe paper          # the reference implementation's method, exactly
    revdeq train --recipe equilibrium    # revdeq's own (the default)

A recipe is a settings layer (dotted keys), beneath `--config`, the environment, `--set` and the flags
(`revdeq_cli.settings.resolve_settings`); what it leaves unset takes the settings' defaults.

`paper` is sammccallum/reversible-deq `experiments/language/language-deq.py`: z0 = 0, the GPT block with the
state's skip, the exact reversible gradient through every solver step taken (beta 0.5, tol 1e-3, at most 4 steps,
float64 states), no penalty, no graph-free start, the z_N readout; AdamW 3e-4 (betas 0.9 / 0.999, weight decay
1e-4, no clipping, no warm-up) with reduce-on-plateau (factor 0.5), batch 32. docs/recipes.md holds each setting
beside the reference's line, and what differs (the reference's plateau watches the training loss over 200-step
windows with patience 10; here the validation loss every `train.eval_every` = 100 steps, patience 20).

`equilibrium` (docs/equilibrium-study.md) trains a model whose output is a fixed point, flat from its trained
depth to many more inference steps: z0 = x with the input's skip, a graph-free start of a Poisson-lognormal number
of steps (mean 6, at most 24) before the differentiated steps (2 for tiny, 4 otherwise), a fixed-point penalty of
2 on the worst 10% of positions ramped in over the first 20% of the run, the cross-entropy also read at f(z_N),
and the reversible pair's midpoint read at inference. Its gradient is exact for the differentiated steps after the
graph-free start (the start itself gets no gradient). lr 4e-3 for tiny (the study's best), 2e-3 otherwise.
"""

from __future__ import annotations

from typing import Any

DEFAULT_RECIPE = "equilibrium"

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "model.init_state": "zeros", "model.block_skip": "state",
        "solver.solver": "reversible", "solver.adjoint": "reversible", "solver.beta": 0.5, "solver.tol": 1e-3,
        "solver.max_steps": 4, "solver.state_dtype": "float64", "solver.inference_readout": "z",
        "objective.detached_steps": "0", "objective.fixed_point_penalty": 0.0, "objective.next_iterate_loss": 0.0,
        "train.lr": 3e-4, "train.schedule": "plateau", "train.plateau_factor": 0.5, "train.plateau_patience": 20,
        "train.weight_decay": 1e-4, "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.adam_eps": 1e-8,
        "train.grad_clip": 0.0, "train.warmup_steps": 0, "train.batch_size": 32,
    },
    "equilibrium": {
        "model.init_state": "input", "model.block_skip": "input",
        "solver.solver": "reversible", "solver.adjoint": "reversible", "solver.beta": 0.5, "solver.tol": 1e-3,
        "solver.max_steps": 4, "solver.state_dtype": "float64", "solver.inference_readout": "midpoint",
        "objective.detached_steps": "poisson-lognormal:6:24", "objective.fixed_point_penalty": 2.0,
        "objective.penalty_tail": 0.1, "objective.penalty_ramp": 0.2, "objective.next_iterate_loss": 1.0,
        "train.lr": 2e-3, "train.schedule": "cosine",
    },
}
# Per preset, where a recipe's value depends on the model's size.
RECIPE_PRESET_VALUES: dict[tuple[str, str], dict[str, Any]] = {
    ("equilibrium", "tiny"): {"solver.max_steps": 2, "train.lr": 4e-3},
}


def recipe_values(name: str, preset: str) -> dict[str, Any]:
    """The dotted settings recipe `name` sets for preset `preset`. KeyError for an unknown name."""
    return {**RECIPES[name], **RECIPE_PRESET_VALUES.get((name, preset), {})}


def model_overrides(name: str, preset: str) -> dict[str, Any]:
    """A recipe's model and solver settings as `RevDEQConfig` keyword arguments, for library users:
    `RevDEQConfig.from_preset("tiny", **model_overrides("equilibrium", "tiny"))`. Its inference depth
    (`inference_max_steps`) is the run's business: `revdeq train` stores the depth it trained at."""
    return {key.split(".", 1)[1]: value for key, value in recipe_values(name, preset).items()
            if key.split(".", 1)[0] in ("model", "solver")}
