"""What each fixed-point solver is, in one torch-free table (a leaf: imports nothing of revdeq_cli).

`deq` (make_solver / make_adjoint, `solve`'s default gradient), the model config and the settings all
read it, so a solver's name, its beta rule, its default gradient method and the solver of its implicit
backward pass are written once (docs/DESIGN.md §1, §5).

    SOLVER_FACTS["picard"].default_adjoint      # "unrolled"
    SOLVER_FACTS["reversible"].beta_one_allowed  # False

Decisions recorded here (issue 19; before it the three places disagreed):

* default gradient: Picard and Relaxed take the unrolled gradient (exact for the iteration they run, and
  their iterates are cheap to keep), Anderson and Broyden the implicit one, Reversible its own. `deq.solve`
  used to give Picard and Relaxed the implicit gradient; it now follows this table, as the settings did.
* the implicit backward pass (`u = J^T u + g`) is solved with Broyden for every forward solver, as the model
  did (its memory study is in deq/solvers.py); `deq.make_adjoint("implicit")` and a bare
  `deq.ImplicitAdjoint()` used Anderson(m=5) and now use Broyden too.
* beta: every solver that takes one wants it in (0, 2); the reversible one also not 1 (its reversal divides
  by 1 - beta). Picard and Broyden ignore beta.
"""

from __future__ import annotations

from dataclasses import dataclass

BETA_LOW, BETA_HIGH = 0.0, 2.0  # the open interval every beta must lie in (the solvers that take one)


@dataclass(frozen=True)
class SolverFacts:
    """One solver: whether its step uses beta (and whether beta = 1 is refused), its default gradient
    method (a name of ADJOINTS), the solver of the implicit gradient's backward system, and how many
    evaluations of f one step makes (after the one `init` makes at z0)."""

    name: str
    takes_beta: bool
    beta_one_allowed: bool
    default_adjoint: str
    backward_solver: str
    evaluations_per_step: int = 1

    def beta_rule(self) -> str:
        """The beta rule in words: "in (0, 2)", or "in (0, 2) and != 1 (the reversal divides by 1 - beta)"."""
        return "in (0, 2)" if self.beta_one_allowed else "in (0, 2) and != 1 (the reversal divides by 1 - beta)"


SOLVER_FACTS: dict[str, SolverFacts] = {
    f.name: f
    for f in (
        SolverFacts("reversible", takes_beta=True, beta_one_allowed=False, default_adjoint="reversible",
                    backward_solver="broyden", evaluations_per_step=2),  # f(y[n+1]), then f(z[n+1])
        SolverFacts("picard", takes_beta=False, beta_one_allowed=True, default_adjoint="unrolled",
                    backward_solver="broyden"),
        SolverFacts("relaxed", takes_beta=True, beta_one_allowed=True, default_adjoint="unrolled",
                    backward_solver="broyden"),
        SolverFacts("anderson", takes_beta=True, beta_one_allowed=True, default_adjoint="implicit",
                    backward_solver="broyden"),
        SolverFacts("broyden", takes_beta=False, beta_one_allowed=True, default_adjoint="implicit",
                    backward_solver="broyden"),
    )
}
SOLVERS: tuple[str, ...] = tuple(SOLVER_FACTS)  # the deq solvers, in this order
ADJOINTS: tuple[str, ...] = ("reversible", "unrolled", "implicit", "phantom")  # the gradient methods
EXPLICIT = "explicit"  # the model's non-DEQ baseline: no solver, no gradient method
BETA_SOLVERS: tuple[str, ...] = tuple(name for name, f in SOLVER_FACTS.items() if f.takes_beta)

