"""One table of solver facts (revdeq_cli.solver_facts): deq, the model config and the settings agree on the
names, the beta rule, the default gradient method and the implicit gradient's backward solver."""

from __future__ import annotations

import pytest
import torch

from revdeq_cli import deq
from revdeq_cli.deq.solve import default_adjoint
from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model import config as model_config
from revdeq_cli.settings import ADJOINT_FOR_SOLVER, ADJOINT_NAMES, SOLVER_NAMES, SolverSettings
from revdeq_cli.solver_facts import ADJOINTS, BETA_SOLVERS, EXPLICIT, SOLVER_FACTS, SOLVERS
from revdeq_cli.training.remedies import BETA_SOLVERS as LOOP_BETA_SOLVERS

ADJOINT_CLASSES = {"reversible": deq.ReversibleAdjoint, "unrolled": deq.UnrolledAdjoint,
                   "implicit": deq.ImplicitAdjoint, "phantom": deq.PhantomAdjoint}


def test_every_layer_names_the_same_solvers_and_gradients():
    assert deq.SOLVERS == SOLVERS == tuple(SOLVER_FACTS)
    assert SOLVER_NAMES == model_config.SOLVERS == (*SOLVERS, EXPLICIT)
    assert deq.ADJOINTS == ADJOINT_NAMES == model_config.ADJOINTS == ADJOINTS
    assert LOOP_BETA_SOLVERS == BETA_SOLVERS == ("reversible", "relaxed", "anderson")


@pytest.mark.parametrize("name", SOLVERS)
def test_solve_and_the_settings_give_a_solver_the_same_default_gradient(name):
    """Picard and Relaxed: unrolled (deq.solve used to give them the implicit gradient)."""
    solver = deq.make_solver(name)
    assert type(default_adjoint(solver)) is ADJOINT_CLASSES[ADJOINT_FOR_SOLVER[name]]
    assert ADJOINT_FOR_SOLVER[name] == SOLVER_FACTS[name].default_adjoint
    w = torch.nn.Linear(3, 3, dtype=torch.float64)
    with torch.no_grad():
        w.weight.mul_(0.1)
    sol = deq.solve(lambda z, x: torch.tanh(w(z)) + x, torch.zeros(2, 3, dtype=torch.float64),
                    torch.ones(2, 3, dtype=torch.float64), solver=solver, params=list(w.parameters()), max_steps=4)
    assert sol.z.shape == (2, 3)


@pytest.mark.parametrize("name", SOLVERS)
def test_the_implicit_backward_system_is_solved_by_broyden_everywhere(name):
    """The model used Broyden where make_adjoint and a bare ImplicitAdjoint used Anderson(m=5)."""
    assert SOLVER_FACTS[name].backward_solver == "broyden"
    assert isinstance(deq.make_adjoint("implicit", solver=name).solver, deq.Broyden)
    if name != "reversible":
        model = RevDEQForCausalLM(RevDEQConfig.from_preset("tiny", vocab_size=16, solver=name, adjoint="implicit"))
        adjoint = model._adjoint()
        assert isinstance(adjoint, deq.ImplicitAdjoint) and isinstance(adjoint.solver, deq.Broyden)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("beta", [0.5, 1.0, 1.9, 0.0, 2.0, -1.0])
def test_deq_the_model_config_and_the_settings_refuse_the_same_betas(name, beta):
    facts = SOLVER_FACTS[name]
    refused = not 0 < beta < 2 or (beta == 1.0 and not facts.beta_one_allowed)
    try:
        SolverSettings(solver=name, beta=beta)
        settings_refuse = False
    except ValueError:
        settings_refuse = True
    try:
        RevDEQConfig.from_preset("tiny", vocab_size=16, solver=name, adjoint=facts.default_adjoint, beta=beta)
        config_refuses = False
    except ConfigError:
        config_refuses = True
    assert settings_refuse == config_refuses == refused
    if facts.takes_beta:
        try:
            deq.make_solver(name, beta=beta)
            deq_refuses = False
        except ValueError:
            deq_refuses = True
        assert deq_refuses == refused
