"""POT's API backed by transferops: ``from transferops.compat import pot as ot``.

POT's module layout (``ot.bregman``, ``ot.unbalanced``, ``ot.lp``, ``ot.da``, ``ot.utils``)
and argument semantics: numpy in gives numpy out, torch in gives torch out (on the inputs'
device, with gradients), POT's warnings (UserWarning) where POT warns, and every argument
honoured or rejected with a message naming it (method-specific keywords included: none is
swallowed). Where the values differ from POT's, docs/ot.md lists it with the reason; the main
one: every entropic ``method`` runs the same log-stable solver to ``stopThr``, so the results
are those every POT method converges to.
"""
from . import bregman, da, lp, unbalanced, utils
from .bregman import barycenter, empirical_sinkhorn2, sinkhorn, sinkhorn2
from .lp import emd, emd2
from .solvers import solve, solve_sample
from .unbalanced import sinkhorn_unbalanced, sinkhorn_unbalanced2
from .utils import dist, unif

__all__ = ["bregman", "da", "lp", "unbalanced", "utils", "barycenter", "empirical_sinkhorn2", "sinkhorn",
           "sinkhorn2", "emd", "emd2", "solve", "solve_sample", "sinkhorn_unbalanced", "sinkhorn_unbalanced2",
           "dist", "unif"]
