"""qprobe: Q-probes for frozen language models (Li et al., 2024, arXiv 2402.14688)."""

from qprobe.errors import FeatureSpecMismatch, QProbeError
from qprobe.features import FeatureSpec

__version__ = "0.1.0"

__all__ = ["FeatureSpec", "FeatureSpecMismatch", "QProbeError", "__version__"]
