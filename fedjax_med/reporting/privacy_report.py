"""``fedjax-med report``: train one task under several settings, attack each, write the report.

For every setting of ``config.report.settings`` (see :mod:`fedjax_med.reporting.settings`):

1. train it into ``DIR/runs/<name>`` with the ordinary trainers (a finished run with the same
   config is reused, an interrupted one resumed), so ``fedjax-med attack ... --workdir
   DIR/runs/<name>`` works on each;
2. membership inference on the trained model: the loss threshold (Yeom et al., CSF 2018) on
   the whole training vs test split, and LiRA (Carlini et al., IEEE S&P 2022, online, global
   variance) on a pool of training and test examples with ``report.shadow_models`` shadow models
   trained together under ``vmap`` once per task;
3. gradient inversion against what the server receives in that setting
   (:mod:`fedjax_med.reporting.threats`), in the first round (the initial model, where updates
   leak most) or the last (``report.inversion_round``);
4. for DP settings, a canary audit of the setting's own release code at its noise multiplier,
   and for central DP-SGD a one-run audit (Steinke et al. 2023) of the whole run, sampler and
   composition included; then deliberately broken variants (noise, clipping, sampling) on the
   DP-SGD setting with the most noise (the smallest claim, so the broken code can be caught).

Then every setting of ``config.report.poisoning`` (malicious clients against a server defence,
:mod:`fedjax_med.trainers.poisoning`) is trained into ``DIR/poisoning/<name>``, and its clean
accuracy and attack success, per round and at the end, go to ``report.json["poisoning"]``.

Writes ``DIR/report.json`` (keys documented in the README), ``DIR/report.md`` and the plots
``utility_vs_epsilon.png``, ``mia_roc.png``, ``reconstructions.png``, ``audit.png`` and, with
poisoning settings, ``poisoning.png``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from fedjax_med import randomness
from fedjax_med.config import loading
from fedjax_med.privacy import claim as claim_lib
from fedjax_med.reporting import markdown, plots, runs, threats, training_pool
from fedjax_med.reporting import settings as settings_lib
from fedjax_med.trainers import registry as trainers
from fedjax_med.training import checkpoint, compilation
from fedjax_med.training import report as report_lib

logger = logging.getLogger("fedjax_med")

SCHEMA_VERSION = 1
PLOTS = {
    "utility_vs_epsilon": "utility_vs_epsilon.png",
    "mia_roc": "mia_roc.png",
    "reconstructions": "reconstructions.png",
    "audit": "audit.png",
}
POISONING_PLOT = "poisoning.png"
SEGMENTATION_UTILITY = ("test_dice", "test_dice_all_background", "test_iou", "test_hd95")
# Streams of the report's own randomness, folded into jax.random.key(config.seed).
STREAM_SHADOWS = randomness.REPORT_SHADOWS
STREAM_INVERSION = randomness.REPORT_INVERSION
STREAM_AUDIT = randomness.REPORT_AUDIT


def train_setting(setting: settings_lib.Setting, run_dir: str, quiet: bool) -> tuple[dict, str]:
    """Trains (or reuses, or resumes) the setting's run; ``(run report, how)``."""
    wanted = loading.to_json_dict(setting.config)
    report_path = os.path.join(run_dir, "report.json")
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            previous = json.load(f)
        if previous.get("config") == wanted:
            return previous, "reused"
    resume = False
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        saved = None
        if os.path.exists(config_path):
            with open(config_path) as f:
                saved = json.load(f)
        if saved != wanted:
            raise ValueError(
                f"'{run_dir}' holds a run of a different config than report setting "
                f"'{setting.name}'; choose a new --workdir or delete that folder"
            )
        resume = True
    trainers.train(setting.config, run_dir, resume=resume, quiet=quiet)
    with open(report_path) as f:
        return json.load(f), "resumed" if resume else "trained"


def _train_job(job: tuple[settings_lib.Setting, str, bool]) -> tuple[dict, str]:
    """:func:`train_setting` of one ``(setting, run_dir, quiet)`` (picklable for the workers)."""
    return train_setting(*job)


def run_epsilon(privacy: dict[str, Any] | None) -> float | None:
    """The run's claimed epsilon (the worst site's under local DP), ``None`` when not private."""
    if not privacy:
        return None
    return claim_lib.PrivacyClaim.from_report(privacy).epsilon


def _task_key(config: ml_collections.ConfigDict) -> str:
    """Settings that share data, model and seed share shadow models."""
    return json.dumps(
        {"data": config.data.to_dict(), "model": config.model.to_dict(), "seed": config.seed},
        sort_keys=True,
        default=str,
    )


def _without_curve(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("fpr", "tpr")}


def _run_entry(setting, run_dir, workdir, how, train_seconds, run_report) -> dict[str, Any]:
    """What the run itself says: defences, utility, epsilon, and its claim's threat model."""
    privacy = run_report.get("privacy")
    claim = claim_lib.PrivacyClaim.from_report(privacy) if privacy else None
    return {
        "description": setting.describe(),
        "defences": list(setting.defences),
        "workdir": os.path.relpath(run_dir, workdir),
        "run": how,
        "train_seconds": round(train_seconds, 2),
        "utility": {
            **{
                k: run_report["metrics"].get(k)
                for k in ("test_accuracy", "test_balanced_accuracy", "test_auroc", "test_loss")
            },
            # Segmentation: the Dice and what predicting all background would score.
            **{k: v for k, v in run_report["metrics"].items() if k in SEGMENTATION_UTILITY},
        },
        "worst_site_accuracy": run_report.get("site_summary", {}).get("worst_accuracy"),
        "epsilon": run_epsilon(privacy),
        "delta": privacy.get("delta") if privacy else None,
        "privacy_level": privacy.get("level") if privacy else None,
        "noise_multiplier": privacy.get("noise_multiplier") if privacy else None,
        "claim": None
        if claim is None
        else {
            "guarantee": claim.guarantee,
            "mechanism": claim.mechanism,
            "unit": claim.unit,
            "neighbouring_relation": claim.relation,
            "trusted": claim.trusted,
            "adversary": claim.adversary,
            "noise_seed_mode": claim.randomness_mode,
            "released_outside_guarantee": list(claim.released_outside),
        },
    }


def _membership(setting, experiment, params, config, shadows, key) -> tuple[dict, dict]:
    """``(membership entry, ROC curve)``: loss threshold, and LiRA when shadows are asked for
    (one set of shadows per task, shared by the settings that train the same task)."""
    r = config.report
    loss_mia = runs.loss_threshold_attack(experiment, params)
    entry = {"loss_threshold": _without_curve(loss_mia)}
    if experiment.splits.info.task == "segmentation":
        entry["dice_threshold"] = _without_curve(runs.dice_threshold_attack(experiment, params))
    curve = loss_mia
    if r.shadow_models >= 2:
        task = _task_key(setting.config)
        if task not in shadows:
            logger.info("training %d LiRA shadow models under vmap", r.shadow_models)
            shadows[task] = runs.LiraShadows(
                experiment,
                num_models=r.shadow_models,
                steps=r.shadow_steps,
                lr=r.shadow_lr,
                batch_size=r.shadow_batch_size or None,
                pool_size=r.pool_size,
                seed=config.seed,
                key=key,
            )
        curve = shadows[task].attack(params)
        entry["lira"] = _without_curve(curve)
    roc = {"name": setting.name, "fpr": curve["fpr"], "tpr": curve["tpr"], "auc": curve["auc"]}
    return entry, roc


def _inversion(setting, experiment, params, privacy, victims, r, key) -> tuple[dict, dict]:
    """``(inversion entry, gallery row)`` of the update of ``report.inversion_round``."""
    attacked = runs.initial_params(experiment) if r.inversion_round == "first" else params
    inversion, reconstruction = threats.invert(
        setting,
        experiment,
        attacked,
        privacy,
        victims,
        local_steps=r.inversion_local_steps,
        steps=r.inversion_steps,
        restarts=r.inversion_restarts,
        key=key,
    )
    row = {
        "name": setting.name,
        "originals": victims.images[: victims.num_victim],
        "reconstructions": reconstruction,
        "psnr": inversion.get("psnr"),
        "bounds": victims.bounds,
    }
    return {**inversion, "round": r.inversion_round}, row


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
    """Builds the whole report in ``workdir``; returns what ``report.json`` holds.

    With ``config.report.fast_compile`` every program of the report is compiled without XLA's
    optimisation passes (:mod:`fedjax_med.training.compilation`).
    """
    with compilation.xla_optimizations(not config.report.fast_compile):
        return _run(config, workdir, quiet=quiet)


def _run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool) -> dict:
    plots.require_matplotlib()
    start = time.time()
    settings = settings_lib.resolve(config)
    poisoning_settings = settings_lib.resolve_poisoning(config)
    os.makedirs(workdir, exist_ok=True)
    r = config.report
    # Workers train ahead (their progress bars would interleave, so they train quietly).
    quiet_training = quiet or r.workers > 0
    jobs = [(s, os.path.join(workdir, "runs", s.name), quiet_training) for s in settings]
    jobs += [
        (s, os.path.join(workdir, "poisoning", s.name), quiet_training) for s in poisoning_settings
    ]
    names = [s.name for s in settings] + [s.name for s in poisoning_settings]
    with training_pool.trained_in_order(_train_job, jobs, names, r.workers) as trained:
        return _attack_all(config, workdir, settings, poisoning_settings, trained, start)


def _attack_all(config, workdir, settings, poisoning_settings, trained, start) -> dict:
    """Attacks and audits each trained setting, then tabulates the poisoning runs."""
    r = config.report
    root_key = jax.random.key(config.seed)
    audit_kwargs = dict(trials=r.audit_trials, confidence=r.audit_confidence)
    shadows: dict[str, runs.LiraShadows] = {}
    entries: dict[str, dict[str, Any]] = {}
    curves, gallery, audits = [], [], []
    majority = None
    broken_on = None  # (noise multiplier, threats.audit arguments, key) of the broken audits
    for index, setting in enumerate(settings):
        logger.info("report setting %d/%d: %s", index + 1, len(settings), setting.name)
        run_dir = os.path.join(workdir, "runs", setting.name)
        (run_report, how), train_seconds = next(trained)
        entry = _run_entry(setting, run_dir, workdir, how, train_seconds, run_report)
        tic = time.time()
        experiment, params = runs.restore(run_dir)
        if majority is None:
            majority = majority_class_accuracy(experiment)
        privacy = run_report.get("privacy")
        entry["membership"], roc = _membership(
            setting,
            experiment,
            params,
            config,
            shadows,
            jax.random.fold_in(root_key, STREAM_SHADOWS),
        )
        curves.append(roc)
        victims = threats.pick_victims(setting, experiment, r.inversion_batch_size)
        inversion_key = jax.random.fold_in(jax.random.fold_in(root_key, STREAM_INVERSION), index)
        entry["inversion"], row = _inversion(
            setting, experiment, params, privacy, victims, r, inversion_key
        )
        gallery.append(row)
        entry["audit"] = entry["run_audit"] = None
        if setting.private:
            audit_key = jax.random.fold_in(jax.random.fold_in(root_key, STREAM_AUDIT), index)
            args = (setting, experiment, params, privacy, victims)
            result = threats.audit(*args, mechanism="correct", key=audit_key, **audit_kwargs)
            if result is not None:
                entry["audit"] = result.as_dict()
                audits.append({"name": setting.name, **result.as_dict()})
                # Broken code is audited where the claim is smallest (most noise), where a
                # finite number of trials can show that it is not kept.
                dp_sgd_like = {"dp_sgd", "local_dp_sgd"} & set(setting.defences)
                if dp_sgd_like and (broken_on is None or result.noise_multiplier > broken_on[0]):
                    broken_on = (result.noise_multiplier, args, audit_key)
            whole = threats.run_audit(
                setting,
                privacy,
                mechanism="correct",
                canaries_count=r.audit_trials,
                confidence=r.audit_confidence,
                key=audit_key,
            )
            if whole is not None:
                entry["run_audit"] = whole.as_dict()
                audits.append({"name": f"{setting.name} (whole run)", **whole.as_dict()})
        entry["attack_seconds"] = round(time.time() - tic, 2)
        entries[setting.name] = entry
    if broken_on is not None:
        _, args, audit_key = broken_on
        for mechanism in (m.strip() for m in r.broken_mechanisms.split(",") if m.strip()):
            bad = threats.audit(*args, mechanism=mechanism, key=audit_key, **audit_kwargs)
            audits.append({"name": f"{args[0].name} [{mechanism}]", **bad.as_dict()})
        # The sampler too: every canary in every step while the claim counts Poisson sampling.
        bad_run = threats.run_audit(
            args[0],
            args[3],
            mechanism="no_subsampling",
            canaries_count=r.audit_trials,
            confidence=r.audit_confidence,
            key=audit_key,
        )
        if bad_run is not None:
            audits.append(
                {"name": f"{args[0].name} (whole run) [no_subsampling]", **bad_run.as_dict()}
            )
    report = _assemble(config, entries, audits, majority, time.time() - start)
    _write_plots(workdir, entries, curves, gallery, audits, majority)
    poisoning = _poisoning(poisoning_settings, workdir, trained)
    if poisoning:
        report["poisoning"] = poisoning
        report["plots"]["poisoning"] = POISONING_PLOT
    report["seconds"] = round(time.time() - start, 2)
    report = report_lib.json_safe(report)
    checkpoint.write_json_atomic(os.path.join(workdir, "report.json"), report)
    markdown.write(os.path.join(workdir, "report.md"), report)
    return report


def _poisoning(poisoning_settings, workdir: str, trained) -> dict[str, Any]:
    """Every poisoning setting's trained run; ``{name: entry}`` and the attack-success plot."""
    entries = {}
    for setting in poisoning_settings:
        logger.info("report poisoning setting: %s", setting.name)
        run_dir = os.path.join(workdir, "poisoning", setting.name)
        (run_report, how), train_seconds = next(trained)
        c = setting.config
        result = run_report.get("poisoning", {})
        entries[setting.name] = {
            "attack": c.poisoning.kind,
            "defence": settings_lib.poisoning_defence(c),
            "malicious_clients": result.get("malicious_clients", []),
            "num_clients": run_report["federated"]["num_clients"],
            "test_accuracy": run_report["metrics"].get("test_accuracy"),
            "test_attack_success": result.get("test_attack_success"),
            "per_round": result.get("per_round", []),
            "workdir": os.path.relpath(run_dir, workdir),
            "run": how,
            "train_seconds": round(train_seconds, 2),
        }
    if entries:
        curves = [
            {
                "name": f"{name} ({e['defence']})",
                "rounds": [r["round"] for r in e["per_round"]],
                "values": [r["val_attack_success"] for r in e["per_round"]],
            }
            for name, e in entries.items()
            if e["test_attack_success"] is not None
        ]
        path = os.path.join(workdir, POISONING_PLOT)
        if curves:
            plots.attack_success_vs_rounds(path, curves)
        else:
            plots.message_figure(path, "no targeted poisoning setting")
    return entries


def _assemble(config, entries, audits, majority, seconds) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "settings": entries,
        "audits": audits,
        "majority_class_accuracy": majority,
        "plots": dict(PLOTS),
        "report_md": "report.md",
        "config": loading.to_json_dict(config),
        "seconds": round(seconds, 2),
    }


def majority_class_accuracy(experiment: Any) -> float | None:
    """Test accuracy of always predicting the most common training label (single-label tasks)."""
    labels = np.asarray(experiment.splits.test.labels)
    if labels.ndim != 1:
        return None
    train_labels = np.asarray(experiment.splits.train.labels).astype(np.int64)
    return float(np.mean(labels == np.bincount(train_labels).argmax()))


def _write_plots(workdir, entries, curves, gallery, audits, majority) -> None:
    points = []
    for name, e in entries.items():
        if e["utility"]["test_accuracy"] is None:
            continue
        group = (
            "DP-SGD"
            if {"dp_sgd", "local_dp_sgd"} & set(e["defences"])
            else "DP-FedAvg"
            if "dp_fedavg" in e["defences"]
            else name
        )
        points.append(
            {
                "name": name,
                "epsilon": e["epsilon"],
                "value": e["utility"]["test_accuracy"],
                "group": group,
            }
        )
    plots.utility_vs_epsilon(
        os.path.join(workdir, PLOTS["utility_vs_epsilon"]), points, chance=majority
    )
    plots.roc_curves(os.path.join(workdir, PLOTS["mia_roc"]), curves)
    lo = min(g["bounds"][0] for g in gallery)
    hi = max(g["bounds"][1] for g in gallery)
    plots.reconstruction_gallery(
        os.path.join(workdir, PLOTS["reconstructions"]),
        [{k: g[k] for k in ("name", "originals", "reconstructions", "psnr")} for g in gallery],
        value_range=(lo, hi),
    )
    rows = [
        {
            "name": a["name"],
            "accountant_epsilon": a["accountant_epsilon"],
            "audit_epsilon": a["epsilon_lower_bound"],
        }
        for a in audits
    ]
    if rows:
        plots.audit_vs_accountant(os.path.join(workdir, PLOTS["audit"]), rows)
    else:
        plots.message_figure(os.path.join(workdir, PLOTS["audit"]), "no DP setting to audit")
