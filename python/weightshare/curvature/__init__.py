"""Curvature of the loss w.r.t. the compressible weights: gradients, exact Hessian and Gauss-Newton products,
and the diagonals (Hutchinson, empirical Fisher) that weight the second-order model dL = g.dW + 1/2 dW.H.dW.

Files: parameters.py (which weights, argument checks), functional.py (the loss as a function of the weights),
output_hessian.py (closed-form H_out products), traced.py + tangents.py (the forward as traced ATen ops and
Pearlmutter's R-forward over them: J v for the products), products.py (hvp, ggn_vp), accumulators.py (streaming
means), diagonals.py (gradient, hessian_diag, ggn_diag, fisher_diag), fused_fisher.py (the Fisher diagonal
through ws.ops.sq_grad_accum), stats.py (CurvatureStats, gather_stats).
"""
from weightshare.curvature.diagonals import fisher_diag, ggn_diag, gradient, hessian_diag
from weightshare.curvature.parameters import compressible_parameters
from weightshare.curvature.products import DEFAULT_HVP_METHOD, HVP_METHODS, ggn_vp, hvp
from weightshare.curvature.stats import CurvatureStats, gather_stats

__all__ = ["compressible_parameters", "hvp", "ggn_vp", "gradient", "hessian_diag", "ggn_diag", "fisher_diag",
           "CurvatureStats", "gather_stats", "HVP_METHODS", "DEFAULT_HVP_METHOD"]
