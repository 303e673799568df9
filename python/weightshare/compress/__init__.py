"""Compression: the loss-aware method (second-order loss model + trust-region allocation) and the baselines."""
from weightshare.compress.api import CompressResult, LayerReport, compress
from weightshare.compress.baselines import METHODS, fit_baseline
from weightshare.compress.dead_units import DeadUnitReport, zero_dead_units_
from weightshare.compress.prune import PruneResult, prune_retrain
from weightshare.compress.quadratic import Fit, fit_layer

__all__ = ["compress", "CompressResult", "LayerReport", "METHODS", "fit_baseline", "Fit", "fit_layer", "prune_retrain",
           "PruneResult", "zero_dead_units_", "DeadUnitReport"]
