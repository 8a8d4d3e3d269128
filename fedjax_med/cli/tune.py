"""``tune`` command line: a DP hyperparameter search with its whole privacy cost.

    fedjax-med tune --config dp_sgd:tiny --workdir runs/tune \\
        --space "optimizer.learning_rate=0.5,1,2;train.ema_decay=0,0.9" --eta 1 --gamma 0.2

    fedjax-med tune ... --distribution poisson --mu 5

Runs a random number of trials (Papernot & Steinke 2022; :mod:`fedjax_med.trainers.tune`),
prints ``tune.json``: every trial's score, the best one, and the epsilon of the whole search
(``tune.png``: score against trial, with matplotlib).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from fedjax_med.config import loading
from fedjax_med.trainers import tune as tune_lib


def register(subparsers: argparse._SubParsersAction, add_config_args, add_common_args) -> None:
    """Adds the ``tune`` command."""
    parser = subparsers.add_parser(
        "tune",
        help="private hyperparameter search; reports the epsilon of the whole search",
        description="Run K ~ truncated negative binomial(eta, gamma) or Poisson(mu) DP-SGD "
        "trials with hyperparameters drawn from --space, release the best by its validation "
        "metric, and "
        "report the epsilon of the whole search (Papernot & Steinke, ICLR 2022).",
    )
    add_config_args(parser)
    parser.add_argument("--workdir", required=True, help="output folder (trial_<i>/, tune.json)")
    parser.add_argument(
        "--space", required=True, help='"FIELD=V1,V2;FIELD=V1,V2" (optimizer, model fields)'
    )
    parser.add_argument("--eta", type=float, default=1.0, help="eta >= 0 (default 1: geometric)")
    parser.add_argument("--gamma", type=float, default=0.2, help="gamma in (0, 1) (default 0.2)")
    parser.add_argument(
        "--distribution",
        default="negative_binomial",
        choices=tune_lib.DISTRIBUTIONS,
        help="law of the number of trials: truncated negative binomial (--eta, --gamma; "
        "Theorem 2) or Poisson (--mu; Theorem 6)",
    )
    parser.add_argument("--mu", type=float, default=5.0, help="Poisson mean mu >= 1 (default 5)")
    parser.add_argument("--metric", default="val_accuracy", help="validation metric to maximise")
    add_common_args(parser)


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Runs the search and prints ``tune.json``; returns 0."""
    config = loading.load_config(args.config, overrides)
    space = tune_lib.parse_space(args.space, config)
    result = tune_lib.tune(
        config,
        args.workdir,
        space,
        eta=args.eta,
        gamma=args.gamma,
        distribution=args.distribution,
        mu=args.mu,
        metric=args.metric,
        quiet=args.quiet,
    )
    print(json.dumps(result, indent=2))
    return 0
