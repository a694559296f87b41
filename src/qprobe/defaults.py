"""Defaults shared by the library, the CLI and experiment files, defined once.

Sampling follows the paper's code experiments (Li et al. 2024): temperature 0.8, top-p 0.95.
"""

TEMPERATURE = 0.8
TOP_P = 0.95
MAX_NEW_TOKENS = 256
