"""``report.md``: the privacy report's numbers as tables a privacy officer can read."""

from __future__ import annotations

import math
import os
from typing import Any

from fedjax_med.training import checkpoint


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _epsilon(entry: dict[str, Any]) -> str:
    if entry["epsilon"] is None:
        return "none (not private)"
    return f"{_num(entry['epsilon'])} ({entry['privacy_level']}, delta {_num(entry['delta'])})"


def _inversion(inv: dict[str, Any]) -> str:
    if not inv.get("attacked"):
        return "n/a"
    return (
        f"{_num(inv['psnr'])} dB (random {_num(inv['psnr_random_baseline'])}, "
        f"mean image {_num(inv['psnr_mean_image_baseline'])})"
    )


def _audit(audit: dict[str, Any] | None) -> str:
    if not audit:
        return "n/a"
    return f"{_num(audit['epsilon_lower_bound'])} <= {_num(audit['accountant_epsilon'])}"


def _claims(settings: dict[str, Any]) -> list[str]:
    """Each private setting's claim: the guarantee, who is trusted, what is released outside."""
    lines = ["", "## Privacy claims", ""]
    for name, e in settings.items():
        claim = e.get("claim")
        if claim is None:
            lines.append(f"- **{name}**: no privacy claim.")
            continue
        released = "; ".join(claim["released_outside_guarantee"]) or "nothing"
        lines.append(f"- **{name}**: {claim['guarantee']}. Released outside it: {released}.")
    return lines


def _audits(report: dict[str, Any]) -> list[str]:
    """The audit table, and the claims too few trials could not test."""
    lines = [
        "",
        "## Audits",
        "",
        "Each audit runs the setting's own clipping and noise code on a batch with and without a",
        "canary (an example, a patient or a client, as the setting's unit), half the trials",
        "each, and scores the release's projection on the canary. The accountant's epsilon is",
        "for that one release (the canary always present or absent, no sampling). Rows marked",
        "*(whole run)* are one-run audits (Steinke, Nasr, Jagielski 2023): half of many canaries",
        "join a simulated run of the setting's own steps, sampler and noise code, and the bound",
        "is compared with the whole run's epsilon.",
        "",
        "| audited | mechanism | noise multiplier | clip norm | trials | confidence "
        "| accountant epsilon | empirical lower bound | consistent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report["audits"]:
        lines.append(
            f"| {a['name']} | {a['mechanism']} | {_num(a['noise_multiplier'])} "
            f"| {_num(a['clip_norm'])} | {a['trials']} | {_num(a['confidence'])} "
            f"| {_num(a['accountant_epsilon'])} | {_num(a['epsilon_lower_bound'])} "
            f"| {_num(a['consistent'])} |"
        )
    if not report["audits"]:
        lines.append("| (no DP setting) | | | | | | | | |")
    weak = [
        a["name"]
        for a in report["audits"]
        if a["max_detectable_epsilon"] <= a["accountant_epsilon"]
    ]
    if weak:
        lines += [
            "",
            f"Too few trials to test the claim of: {', '.join(weak)} (even a perfect attack "
            "could not certify an epsilon above the accountant's); raise report.audit_trials.",
        ]
    return lines


# Which defence against poisoning keeps which privacy claim (the poisoning section's table).
DEFENCE_CLAIMS = (
    (
        "none (weighted mean)",
        "the sum",
        "yes",
        "all: secure aggregation, DP-FedAvg, local DP-SGD",
    ),
    (
        "median, trimmed mean, Krum, Multi-Krum, Bulyan",
        "every individual update",
        "no: refused (robust_aggregation.method with secure_aggregation.method)",
        "local DP-SGD's per-site claims (each update is already a DP release); not secure "
        "aggregation's 'the server sees only the sum'",
    ),
    (
        "norm bounding (+ weak DP noise)",
        "every update's norm (the server clips)",
        "no: refused; under a secure sum the clipping would move to the clients, and a "
        "malicious client would skip it",
        "local DP-SGD's; its noise is not calibrated to a sensitivity, so it is no DP claim",
    ),
    (
        "DP-FedAvg (clip S, Gaussian noise)",
        "the sum of clipped updates",
        "yes (clients clip; a malicious client is bounded only by the secure sum's "
        "per-coordinate clip)",
        "client-level DP for the honest clients, whatever the malicious ones send",
    ),
)


def _poisoning(report: dict[str, Any]) -> list[str]:
    """The poisoning table (attack x defence) and which defence keeps which privacy claim."""
    entries = report.get("poisoning")
    if not entries:
        return []
    lines = [
        "",
        "## Poisoning",
        "",
        "Malicious clients poison the federation (their data or the updates they submit) while",
        "the server defends with a robust rule, norm bounding or DP-FedAvg. Clean accuracy is",
        "on the test split; attack success is the fraction of the attack's test images read as",
        "the attacker wants (backdoor: triggered non-target images read as the target class;",
        "label flipping: images read as their flipped label); n/a for an untargeted attack.",
        "",
        "| setting | attack | malicious clients | defence | clean test accuracy "
        "| attack success (test) | attack success, last evaluated round |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        last = e["per_round"][-1]["val_attack_success"] if e["per_round"] else None
        malicious = f"{len(e['malicious_clients'])} of {e['num_clients']}"
        lines.append(
            f"| {name} | {e['attack']} | {malicious} | {e['defence']} "
            f"| {_num(e['test_accuracy'])} | {_num(e['test_attack_success'])} | {_num(last)} |"
        )
    lines += [
        "",
        "What each defence needs to see, whether it runs over secure aggregation, and which",
        "privacy claims it keeps:",
        "",
        "| defence | server needs | with secure aggregation | privacy claims kept |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in DEFENCE_CLAIMS),
    ]
    return lines


def render(report: dict[str, Any]) -> str:
    """The Markdown text of ``report`` (the dict written to ``report.json``)."""
    settings = report["settings"]
    majority = report.get("majority_class_accuracy")
    lines = [
        "# Privacy report",
        "",
        "One task trained under each setting below, then attacked. Membership inference AUC",
        "is 0.5 for a model that leaks nothing about membership; the true-positive rate at a",
        "low false-positive rate says whether *some* patients are confidently exposed. Gradient",
        "inversion is scored by PSNR against the victims' images, beside what guessing gets",
        "(random images; the mean training image). Each audit's empirical epsilon is a lower",
        "bound that holds with the stated confidence; it must not exceed the accountant's",
        "epsilon for the same release, or the implementation does not keep its claim.",
        "",
        "## Settings",
        "",
        *(
            [f"Always predicting the most common class scores {_num(majority)} test accuracy.", ""]
            if majority is not None
            else []
        ),
        "| setting | defences | test accuracy | epsilon | MIA AUC (loss) | MIA AUC (LiRA) "
        "| LiRA TPR @ 0.1% FPR | inversion PSNR | audit: lower bound <= accountant (one release) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in settings.items():
        mia = e["membership"]
        lira = mia.get("lira")
        lines.append(
            f"| {name} | {e['description']} | {_num(e['utility']['test_accuracy'])} "
            f"| {_epsilon(e)} | {_num(mia['loss_threshold']['auc'])} "
            f"| {_num(lira['auc']) if lira else 'n/a'} "
            f"| {_num(lira['tpr_at_0.1%_fpr']) if lira else 'n/a'} "
            f"| {_inversion(e['inversion'])} | {_audit(e['audit'])} |"
        )
    lines += _claims(settings)
    lines += ["", "## What the server sees", ""]
    for name, e in settings.items():
        inv = e["inversion"]
        detail = ""
        if inv.get("attacked"):
            detail = (
                f": {inv['images_behind_update']} image(s) behind the update, PSNR "
                f"{_num(inv['psnr'])} dB and SSIM {_num(inv['ssim'], 2)} on the victim's "
                f"{inv['victim_images']} (random images: {_num(inv['psnr_random_baseline'])} dB, "
                f"the mean training image: {_num(inv['psnr_mean_image_baseline'])} dB)"
            )
            if "label_recovered" in inv:
                detail += f"; label read off the update: {_num(inv['label_recovered'])}"
            elif inv.get("labels_given"):
                detail += "; labels given to the attacker"
        lines.append(f"- **{name}**: {inv['server_sees']}{detail}.")
    lines += _audits(report)
    lines += _poisoning(report)
    lines += ["", "## Plots", ""]
    titles = {
        "utility_vs_epsilon": "Utility against epsilon",
        "mia_roc": "Membership inference ROC curves",
        "reconstructions": "Gradient inversion: victims (top) and reconstructions (bottom)",
        "audit": "Audit lower bound against the accountant",
        "poisoning": "Poisoning: attack success against rounds",
    }
    for key, path in report["plots"].items():
        lines += [f"### {titles.get(key, key)}", "", f"![{key}]({path})", ""]
    lines += [
        "## Reproduce",
        "",
        "Each setting's run is in `runs/<setting>/`; attack one yourself with",
        "`fedjax-med attack membership --workdir runs/<setting>` or",
        "`fedjax-med attack inversion --workdir runs/<setting>`.",
        f"The report took {report['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Writes :func:`render` atomically."""
    checkpoint.write_text_atomic(os.fspath(path), render(report))
