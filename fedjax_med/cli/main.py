"""The ``fedjax-med`` command line: parse arguments, load the config, call the library.

Subcommands: ``train``, ``eval``, ``infer`` (plaintext or encrypted), ``data describe``,
``privacy`` (epsilon and calibration), ``attack`` (against one run), ``report`` (the privacy
report over several settings), ``tune`` (a private hyperparameter search), ``configs`` (the
built-in configs) and ``deploy`` (a config across real hospitals on Flower).
User errors (missing file, bad override, invalid value) print one ``error:`` line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from fedjax_med.cli import attack as attack_cli
from fedjax_med.cli import infer as infer_cli
from fedjax_med.cli import privacy as privacy_cli
from fedjax_med.cli import tune as tune_cli
from fedjax_med.config import loading
from fedjax_med.data import describe, sources
from fedjax_med.deploy import cli as deploy_cli
from fedjax_med.reporting import plots, privacy_report
from fedjax_med.trainers import registry

# OSError covers every filesystem fault (a file where a folder is due, permissions, a full disk):
# its message names the path, so it is reported like the checks that come before any work.
USER_ERRORS = (ValueError, OSError, KeyError)


def error_line(err: BaseException) -> str:
    """The one line printed for a user error: its message, with the path for an ``OSError``."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or err}: '{err.filename}'"
    return " ".join(str(err).split()) or type(err).__name__  # one line, even for a long message


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Adds the required ``--config FILE.py[:ARG]`` option to ``parser``."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE.py[:ARG]",
        help="config file defining get_config(), or a built-in config's name (listed by "
        "fedjax-med configs; a path that exists wins), e.g. quickstart:tiny; fields can be "
        "overridden with --config.FIELD=VALUE, e.g. --config.train.steps=100",
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--quiet`` (warnings only, no progress bar) and ``--debug`` (tracebacks)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``fedjax-med`` parser: train, eval, data describe, privacy, attack and report.

    ``--config.FIELD=VALUE`` overrides are not declared here: :func:`main` collects them from the
    arguments the parser does not know.
    """
    parser = argparse.ArgumentParser(
        prog="fedjax-med",
        description="Federated, differentially private training on medical images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model from a config",
        description="Train from a config into --workdir (metrics.jsonl, checkpoints/, "
        "report.json). Override fields with --config.FIELD=VALUE.",
    )
    add_config_args(train)
    train.add_argument("--workdir", required=True, help="output folder of the run")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --workdir from its checkpoint"
    )
    add_common_args(train)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate the latest checkpoint of a run",
        description="Evaluate the latest checkpoint in --workdir; writes eval_<split>.json.",
    )
    evaluate.add_argument("--workdir", required=True, help="folder of a run made by train")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    add_common_args(evaluate)

    data = sub.add_parser("data", help="inspect datasets", description="Inspect datasets.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    describe = data_sub.add_parser(
        "describe",
        help="print sizes, sites, patients and class balance of a config's data",
        description="Load the data of a config and print split sizes, per-site counts, "
        "patients per site and class prevalence.",
    )
    add_config_args(describe)
    describe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    describe.add_argument(
        "--png",
        metavar="PATH",
        help="also write a grid of training images, one row per site and a block per class "
        "(needs matplotlib: pip install 'fedjax_med[report]')",
    )
    describe.add_argument(
        "--per-class",
        type=int,
        default=3,
        metavar="N",
        help="images per site and class in the --png grid (default 3)",
    )
    add_common_args(describe)

    infer_cli.register(sub)
    privacy_cli.register(sub)
    attack_cli.register(sub)
    deploy_cli.register(sub)
    tune_cli.register(sub, add_config_args, add_common_args)
    sub.add_parser(
        "configs",
        help="list the built-in configs",
        description="List the built-in configs (--config NAME[:ARG]) with their one-line "
        "docstrings.",
    )

    report = sub.add_parser(
        "report",
        help="train a task under several settings, attack each, write a privacy report",
        description="Train every setting of config.report.settings into --workdir/runs/, run "
        "membership inference, gradient inversion and DP audits on each, and write "
        "report.json, report.md and PNG plots into --workdir. Finished runs are reused.",
    )
    add_config_args(report)
    report.add_argument("--workdir", required=True, help="output folder of the report")
    add_common_args(report)
    return parser


def setup_logging(quiet: bool) -> None:
    """Logs to stderr at INFO (WARNING if ``quiet``); quiets jax, orbax, tfds and absl."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # dp_accounting logs (via absl) each RDP order it drops as numerically unstable; dropping
    # orders only makes epsilon conservative.
    logging.getLogger("absl").setLevel(logging.ERROR)


def run_train(args, overrides: Sequence[str]) -> int:
    """``fedjax-med train``: trains into ``--workdir``, prints the test metrics and the report path.

    Returns:
      The exit code, 0.
    """
    config = loading.load_config(args.config, overrides)
    result = registry.train(config, args.workdir, resume=args.resume, quiet=args.quiet)
    print(json.dumps(result.get("metrics", result), indent=2))
    print(f"report: {os.path.join(args.workdir, 'report.json')}")
    return 0


def run_eval(args) -> int:
    """``fedjax-med eval``: prints the latest checkpoint's metrics; writes ``eval_<split>.json``."""
    print(json.dumps(registry.evaluate_workdir(args.workdir, args.split), indent=2))
    return 0


def run_data_describe(args, overrides: Sequence[str]) -> int:
    """``fedjax-med data describe``: prints split sizes, sites, patients and class balance."""
    config = loading.load_config(args.config, overrides)
    if args.png and args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.png:
        plots.require_matplotlib()  # before the data is loaded
    splits = sources.load_splits(config.data, config.seed)
    summary = describe.summarize(splits)
    print(json.dumps(summary, indent=2) if args.json else describe.format_table(summary))
    if args.png:
        train, info = splits.train, splits.info
        images = train.images
        if images.ndim == 5:  # volumes (N, D, H, W, C) are drawn by their middle slice
            images = images[:, images.shape[1] // 2]
        path = plots.sample_grid(
            args.png,
            images,
            train.labels,
            train.sites,
            site_names=info.site_names,
            class_names=info.class_names,
            per_cell=args.per_class,
        )
        print(f"samples: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def run_configs() -> int:
    """``fedjax-med configs``: prints each built-in config's name and one-line docstring."""
    names = loading.builtin_configs()
    width = max(map(len, names))
    for name, line in names.items():
        print(f"{name:<{width}}  {line}")
    return 0


def report_line(name: str, entry: dict) -> str:
    """One setting of the privacy report in a line: utility, epsilon, what the attacks got."""
    eps = entry["epsilon"]
    parts = [
        f"{name:>14}:",
        f"accuracy {entry['utility']['test_accuracy']:.3f}",
        f"epsilon {'none' if eps is None else format(eps, '.3g')}",
        f"MIA AUC {entry['membership']['loss_threshold']['auc']:.3f}",
    ]
    if entry["inversion"].get("attacked"):
        parts.append(f"inversion PSNR {entry['inversion']['psnr']:.1f} dB")
    return "  ".join(parts)


def run_report(args, overrides: Sequence[str]) -> int:
    """``fedjax-med report``: writes the privacy report into ``--workdir``; one line per setting."""
    config = loading.load_config(args.config, overrides)
    result = privacy_report.run(config, args.workdir, quiet=args.quiet)
    for name, entry in result["settings"].items():
        print(report_line(name, entry))
    print(f"report: {os.path.join(args.workdir, 'report.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``fedjax-med`` on ``argv`` (default ``sys.argv[1:]``).

    Returns:
      The exit code: 0, or 2 after printing ``error: <message>`` to stderr for one of
      :data:`USER_ERRORS` (with ``--debug`` the error is raised instead). Unknown arguments, and
      ``--config.FIELD`` overrides to a command that takes none, exit 2 through argparse.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.command not in ("train", "data", "report", "deploy", "tune"):
        parser.error(f"{args.command} takes no --config.FIELD overrides")
    setup_logging(getattr(args, "quiet", False))
    try:
        if args.command == "train":
            return run_train(args, overrides)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "data":
            return run_data_describe(args, overrides)
        if args.command == "report":
            return run_report(args, overrides)
        if args.command == "attack":
            return attack_cli.run(args)
        if args.command == "infer":
            return infer_cli.run(args)
        if args.command == "privacy":
            return privacy_cli.run(args)
        if args.command == "configs":
            return run_configs()
        if args.command == "tune":
            return tune_cli.run(args, overrides)
        if args.command == "deploy":
            return deploy_cli.run(args, overrides)
        parser.error(f"unknown command {args.command}")
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
