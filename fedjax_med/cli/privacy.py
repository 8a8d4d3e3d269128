"""``privacy`` command line: epsilon of a DP-SGD run, or the noise for a target epsilon.

Examples (through the project's main command)::

    fedjax-med privacy epsilon --noise-multiplier 1.1 --sampling-rate 0.01 --steps 1000 \\
        --delta 1e-5
    fedjax-med privacy calibrate --target-epsilon 2 --sampling-rate 0.01 --steps 1000 \\
        --delta 1e-5 --accountant pld

Each prints a short explanation and ends with its answer as the last number of the output
(``epsilon = ...`` or ``noise_multiplier = ...``). User errors raise ValueError.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from fedjax_med.privacy import accounting

_ACCOUNTANT_HELP = (
    "rdp: Renyi DP (fast, slightly loose); pld: privacy loss distributions (tighter, slower)"
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``privacy`` command (subcommands ``epsilon`` and ``calibrate``).

    The parsed namespace carries ``func=run``.
    """
    parser = subparsers.add_parser(
        "privacy",
        help="DP-SGD privacy accounting: epsilon of a run, or noise for a target epsilon",
        description=(
            "Privacy accounting for DP-SGD with Poisson sampling (Abadi et al. 2016): every "
            "example is in a batch with probability --sampling-rate, per-example gradients are "
            "clipped to C and Gaussian noise of std noise_multiplier * C is added to their sum."
        ),
    )
    commands = parser.add_subparsers(dest="privacy_command", metavar="{epsilon,calibrate}")
    commands.required = True

    eps = commands.add_parser(
        "epsilon",
        help="epsilon spent by a DP-SGD run",
        description="Prints the epsilon at --delta of --steps DP-SGD steps.",
    )
    eps.add_argument("--noise-multiplier", type=float, required=True, help="sigma > 0")
    _add_common(eps)

    cal = commands.add_parser(
        "calibrate",
        help="smallest noise multiplier reaching a target epsilon",
        description=(
            "Prints the smallest noise multiplier (within 1%) whose epsilon at --delta after "
            "--steps DP-SGD steps (Poisson-sampled, or --sampling shuffle) is at most "
            "--target-epsilon."
        ),
    )
    cal.add_argument("--target-epsilon", type=float, required=True, help="epsilon > 0")
    _add_common(cal)

    parser.set_defaults(func=run)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sampling",
        choices=accounting.SAMPLINGS,
        default="poisson",
        help="poisson (default; add/remove-one DP) or shuffle: fixed-size batches without "
        "replacement (replace-one DP, noise sigma * 2C, needs --num-examples; RDP only)",
    )
    parser.add_argument(
        "--sampling-rate", type=float, required=True, help="q in (0, 1]: expected batch size / N"
    )
    parser.add_argument("--steps", type=int, required=True, help="number of DP-SGD steps T")
    parser.add_argument("--delta", type=float, required=True, help="delta in (0, 1), << 1/N")
    parser.add_argument(
        "--accountant", choices=accounting.ACCOUNTANTS, default="rdp", help=_ACCOUNTANT_HELP
    )
    parser.add_argument(
        "--num-examples",
        type=int,
        default=None,
        help="N, number of units of privacy (optional: checks delta < 1/N)",
    )


def _describe(args: argparse.Namespace) -> str:
    expected = ""
    if args.num_examples:
        expected = f" (expected batch size {args.sampling_rate * args.num_examples:.4g})"
    return (
        f"DP-SGD: sampling rate q = {args.sampling_rate:g}{expected}, {args.steps} steps, "
        f"delta = {args.delta:g}, accountant = {args.accountant}."
    )


# PLD work of more steps than this takes long enough to announce (RDP answers at once).
_ANNOUNCE_PLD_STEPS = 10_000


def _progress(accountant: str, sigma: float, eps: float) -> None:
    """One stderr line per epsilon evaluation of a calibration, so long work shows progress."""
    print(f"  trying noise_multiplier {sigma:.6g}: {accountant} epsilon {eps:.6g}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Executes ``privacy epsilon`` or ``privacy calibrate``; returns the exit code (0).

    Calibration prints each tried noise multiplier to stderr; PLD work of many steps is
    announced first; PLD of more than ``accounting.PLD_MAX_STEPS`` steps is refused up front.
    """
    if args.num_examples is not None and args.num_examples < 1:
        raise ValueError(f"--num-examples={args.num_examples} must be an integer >= 1")
    accounting.check_delta(args.delta, args.num_examples)
    if args.accountant == "pld":
        accounting.check_pld_work(args.steps)
        if args.steps > _ANNOUNCE_PLD_STEPS:
            print(
                f"PLD accounting of {args.steps} steps (may take a while; --accountant rdp "
                "answers at once)...",
                file=sys.stderr,
            )
    sampling = args.sampling
    extra = {}
    if sampling == "shuffle":
        if not args.num_examples:
            raise ValueError("--sampling shuffle needs --num-examples")
        extra = {
            "num_examples": args.num_examples,
            "batch_size": round(args.sampling_rate * args.num_examples),
        }
    if args.privacy_command == "epsilon":
        event = accounting.dpsgd_event(
            args.noise_multiplier, args.sampling_rate, args.steps, sampling=sampling, **extra
        )
        eps = accounting.epsilon(event, args.delta, args.accountant)
        relation = "replace-one" if sampling == "shuffle" else "add/remove-one"
        print(_describe(args))
        print(f"Noise multiplier {args.noise_multiplier:g}, {sampling} sampling, {relation}.")
        print(f"The run is (epsilon, {args.delta:g})-DP with")
        print(f"epsilon = {eps:.6g}")
        return 0
    if args.privacy_command == "calibrate":
        start = time.perf_counter()
        sigma = accounting.calibrate_noise_multiplier(
            args.target_epsilon,
            args.sampling_rate,
            args.steps,
            args.delta,
            args.accountant,
            sampling=sampling,
            progress=_progress,
            **extra,
        )
        eps = accounting.epsilon(
            accounting.dpsgd_event(
                sigma, args.sampling_rate, args.steps, sampling=sampling, **extra
            ),
            args.delta,
            args.accountant,
        )
        print(_describe(args))
        print(
            f"Target epsilon {args.target_epsilon:g}: reached with epsilon = {eps:.6g} "
            f"(found in {time.perf_counter() - start:.2f} s). Smallest noise multiplier:"
        )
        # Rounded up, so that the printed value still meets the target.
        print(f"noise_multiplier = {math.ceil(sigma * 1e6) / 1e6:.6f}")
        return 0
    raise ValueError(f"unknown privacy command {args.privacy_command!r}")
