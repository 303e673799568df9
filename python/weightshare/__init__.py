"""weightshare: learned weight sharing for PyTorch.

Compress trained networks into codebooks of shared values plus bit-packed indices, learned against a
second-order model of the loss change, and run them directly on the packed form.
"""
from weightshare._native import NATIVE, NATIVE_ERROR, cuda_built
from weightshare import ops
from weightshare.kmeans import kmeans, kmeans_optimal, KMeansResult
from weightshare import nn
from weightshare.replace import replace_layers, ReplaceReport
from weightshare.io import save, load, size_report, SizeReport
from weightshare import curvature
from weightshare.compress import compress, CompressResult

__version__ = "0.1.0"
__all__ = ["ops", "kmeans", "kmeans_optimal", "KMeansResult", "NATIVE", "NATIVE_ERROR", "cuda_built",
           "nn", "replace_layers", "ReplaceReport", "save", "load", "size_report", "SizeReport", "curvature",
           "compress", "CompressResult"]
