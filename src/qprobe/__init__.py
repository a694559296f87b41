"""qprobe: Q-probes for frozen language models (Li et al., 2024, arXiv 2402.14688)."""

from qprobe.errors import FeatureSpecMismatch, QProbeError
from qprobe.features import FeatureSpec

__version__ = "0.1.0"

__all__ = ["FeatureSpec", "FeatureSpecMismatch", "Probe", "QProbeError", "__version__"]


def __getattr__(name: str):  # `from qprobe import Probe` without importing torch for `qprobe --help`
    if name == "Probe":
        from qprobe.probe import Probe

        return Probe
    raise AttributeError(f"module 'qprobe' has no attribute {name!r}")
