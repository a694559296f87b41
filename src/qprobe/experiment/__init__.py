"""A whole Q-probe experiment from one YAML file: `qprobe run EXPERIMENT.yaml`.

- `config`     the config tree (`ExperimentConfig`); the YAML mirrors it, unknown keys refused;
- `run`        `run_experiment`: collect -> baselines -> probes -> evaluate -> report, one
               function per stage, each resuming from what is already in the output folder;
- `baselines`  greedy and few-shot on successes (the shots and their collection);
- `curve`      reward vs number of training prompts (the paper's figure 2);
- `report`     results.md, results.json and the plots;
- `demo`       the experiment behind `qprobe demo`.

See experiments/*.yaml and docs/evaluation.md.
"""

from qprobe.experiment.baselines import collect_with_prefix, few_shot_prefix, pick_shots
from qprobe.experiment.config import (
    BaselinesConfig,
    CurveConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    ProbesConfig,
    SamplingConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from qprobe.experiment.curve import learning_curve
from qprobe.experiment.demo import DEMO, demo_config
from qprobe.experiment.report import write_report
from qprobe.experiment.run import Log, run_experiment

__all__ = [
    "DEMO",
    "BaselinesConfig",
    "CurveConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "Log",
    "ModelConfig",
    "ProbesConfig",
    "SamplingConfig",
    "apply_overrides",
    "collect_with_prefix",
    "config_from_dict",
    "demo_config",
    "few_shot_prefix",
    "learning_curve",
    "load_config",
    "pick_shots",
    "run_experiment",
    "write_report",
]
