"""`qprobe train ROLLOUTS_DIR --objective {q,ce,pg,bt,dpo} --out PROBE_DIR [trainer flags]`.

Reads a rollouts folder, trains a probe on its features and rewards (bt/dpo: its pairs.parquet)
and writes the probe folder atomically. Every field of `qprobe.train.TrainConfig` is a flag
(`--batch-size`, `--hidden 256,64`, `--no-standardize`, ...), generated from the dataclass so the
CLI, the library and `qprobe run` YAML share one definition.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qprobe.commands.flags import add_flags, comma_list, from_args


def register(subparsers: Any) -> None:
    from qprobe.train.config import TrainConfig  # torch-free: keeps `qprobe --help` fast

    p = subparsers.add_parser(
        "train",
        help="train a probe on a rollouts folder",
        description="Train a Q-probe on the features and rewards (bt/dpo: preference pairs) of a "
        "rollouts folder and write PROBE_DIR (probe.safetensors + config.json).",
    )
    p.add_argument("rollouts", metavar="ROLLOUTS_DIR", help="rollouts folder (qprobe-rollouts/1)")
    p.add_argument("--out", required=True, metavar="PROBE_DIR", help="probe folder to write")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    add_flags(p, TrainConfig)
    g = p.add_argument_group("inputs and model selection")
    g.add_argument("--feature-set", default=None, metavar="NAME",
                   help="feature set to train on, e.g. L12-mean (`qprobe embed` adds sets; "
                   "default: the folder's own features; none: only --extras)")
    g.add_argument("--extras", type=comma_list(str), default=[], metavar="NAME,...",
                   help="inputs after the features: logprob_mean, logprob_sum, logprob_tokens "
                   "(need log-likelihoods in the folder), visible_pass (needs `qprobe score "
                   "--visible`), visible_wrong, visible_error, visible_syntax, mbr_share, "
                   "mbr_size (need `qprobe signals --exec`), gen_pass, gen_pass_frac, "
                   "codet_score, mbr_gen_share (need `qprobe signals --gen-exec`), mbr_fuzz_share, mbr_fuzz_size (`qprobe signals --fuzz`), "
                   "reviewer_sum, reviewer_mean, coder_reviewer, coder_reviewer_mean "
                   "(need `qprobe review`)")
    g.add_argument("--cv", type=int, default=0, metavar="N",
                   help="choose the feature set, log-likelihood inputs and regularisation by "
                   "N-fold cross-validation over the training prompts (0: off; scored by the "
                   "held-out selection reward, bt/dpo by held-out pair accuracy); the table goes "
                   "into the probe's config.json")
    g.add_argument("--cv-feature-sets", type=comma_list(str), default=None, metavar="A,B,...",
                   help="--cv: feature sets to try (default: every complete set)")
    g.add_argument("--cv-loglik", type=comma_list(str), default=["without", "with", "only"],
                   metavar="MODES", help="--cv: log-likelihood inputs to try: without, with, only")
    g.add_argument("--cv-visible", type=comma_list(str), default=["without", "with"],
                   metavar="MODES", help="--cv: the visible-test input to try: without, with "
                   "(with: only where the folder has a visible_reward column)")
    g.add_argument("--cv-weight-decay", type=comma_list(float), default=[0.0, 0.1], metavar="X,Y",
                   help="--cv: weight decay values to try (default: 0,0.1)")
    g.add_argument("--cv-min-steps", type=comma_list(int), default=[1000, 10000], metavar="N,M",
                   help="--cv: optimiser step counts to try (default: 1000,10000)")
    g.add_argument("--cv-lr", type=comma_list(float), default=None, metavar="X,Y",
                   help="--cv: learning rates to try (default: --lr alone)")
    g.add_argument("--cv-beta", type=comma_list(float), default=None, metavar="X,Y",
                   help="--cv: policy temperatures to score each probe at (0 = argmax; default: "
                   "--beta alone); the chosen one is stored as the probe's beta")
    g.add_argument("--cv-signals", type=comma_list(str), default=["none"], metavar="G,H",
                   help="--cv: groups of stored signals to try as extra inputs, each 'none' or "
                   "names joined by '+' (e.g. none,mbr_share+codet_score; docs/verifier.md)")
    g.add_argument("--cv-gate", type=comma_list(str), default=["none"], metavar="G,H",
                   help="--cv: gates to try: none, visible_pass (candidates passing the prompt's "
                   "shown test come first; the probe, trained on the rows not failing it, ranks "
                   "inside)")
    g.add_argument("--cv-objectives", type=comma_list(str), default=None, metavar="A,B",
                   help="--cv: objectives to try (default: --objective alone); the probe is "
                   "trained with the one CV picks")
    g.add_argument("--cv-seed", type=int, default=0, help="--cv: seed of the prompt folds")
    p.set_defaults(func=run)


def _own_set(r: Any) -> str:
    from qprobe.rollouts import feature_set_name

    if r.feature_spec is None:
        from qprobe.errors import QProbeError

        raise QProbeError(f"{r.path}: no features; pass --feature-set or only --extras")
    return feature_set_name(r.feature_spec)


def run(args: argparse.Namespace) -> int:
    from qprobe.probe import fingerprint
    from qprobe.rollouts import Rollouts
    from qprobe.train import TrainConfig, arrays_from_rollouts, objectives, train_probe

    cfg = from_args(TrainConfig, args)
    cfg.validate()
    r = Rollouts(args.rollouts)  # one-line QProbeError on a bad folder
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.cv:
        from qprobe.train.cv import CVGrid, train_with_cv

        grid = CVGrid(feature_sets=args.cv_feature_sets, loglik=args.cv_loglik,
                      visible=args.cv_visible, weight_decay=args.cv_weight_decay, min_steps=args.cv_min_steps,
                      lr=args.cv_lr, beta=args.cv_beta, signals=args.cv_signals,
                      objectives=args.cv_objectives, gate=args.cv_gate)
        probe, _ = train_with_cv(r, cfg, grid, folds=args.cv, seed=args.cv_seed, log=log)
    else:
        from qprobe.train.cv import Candidate, fit

        if args.feature_set or args.extras:
            fs = args.feature_set or _own_set(r)
            c = Candidate(None if fs == "none" else fs, tuple(args.extras), cfg.weight_decay,
                          cfg.min_steps)
            probe, _ = fit(r, c, cfg, log=log)
        else:
            data = arrays_from_rollouts(r, cfg.objective)
            fp = fingerprint(data["features"],
                             None if objectives.get(cfg.objective).pairs else data["rewards"],
                             data["prompt_ids"], data["pairs"])
            probe, _ = train_probe(
                data["features"], data["rewards"], data["groups"], data["pairs"], cfg,
                feature_spec=data["feature_spec"], prompt_ids=data["prompt_ids"], log=log,
                data_fingerprint=fp,
            )
    probe.info["training_data"]["rollouts"] = str(r.path)
    out = probe.save(args.out)
    m = probe.info["metrics"]
    extra = "".join(f", {k} {v:.4f}" for k, v in m.items()
                    if k.startswith("val") and isinstance(v, float))
    print(f"wrote {out} (objective {cfg.objective}, {probe.info['training_data']['rows']} rows, "
          f"{m['steps']} steps, loss {m['final_loss']:.4f}{extra}, {m['seconds']:.1f}s)",
          file=sys.stdout, flush=True)
    return 0
