"""``report.md`` from a small hand-built report dict: every row, every number, formatted."""

import math
import os

import pytest

from fedjax_med.reporting import markdown


def _membership(auc, lira=None):
    entry = {"loss_threshold": {"attack": "loss_threshold", "auc": auc}}
    if lira is not None:
        entry["lira"] = {"auc": lira[0], "tpr_at_0.1%_fpr": lira[1]}
    return entry


def _audit(name, lower, accountant, detectable, consistent=True):
    return {
        "name": name,
        "mechanism": "correct" if consistent else "no_noise",
        "noise_multiplier": 1.23456,
        "clip_norm": 1.0,
        "trials": 64,
        "confidence": 0.95,
        "accountant_epsilon": accountant,
        "epsilon_lower_bound": lower,
        "max_detectable_epsilon": detectable,
        "consistent": consistent,
        "delta": 1e-5,
    }


CENTRAL = {
    "description": "centralized (pooled data), no defence",
    "utility": {"test_accuracy": 0.87654},
    "epsilon": None,
    "delta": None,
    "privacy_level": None,
    "membership": _membership(0.61234),
    "inversion": {"server_sees": "the training images themselves (data are pooled)"},
    "audit": None,
    "claim": None,
}
FEDAVG = {
    "description": "federated (FedAvg family), no defence",
    "utility": {"test_accuracy": 0.5},
    "epsilon": None,
    "membership": _membership(0.5, lira=(0.53333, 0.0125)),
    "inversion": {
        "server_sees": "the victim client's model update",
        "attacked": True,
        "images_behind_update": 1,
        "victim_images": 1,
        "psnr": 27.149,
        "ssim": 0.8612,
        "psnr_random_baseline": 9.5,
        "psnr_mean_image_baseline": 20.04,
        "label_recovered": True,
    },
    "audit": None,
    "claim": None,
}
SECAGG = {
    **FEDAVG,
    "description": "federated (FedAvg family), secure aggregation",
    "inversion": {
        **{k: v for k, v in FEDAVG["inversion"].items() if k != "label_recovered"},
        "server_sees": "only the sum of the round's 3 client updates",
        "images_behind_update": 3,
        "psnr": 13.3,
        "labels_given": True,
    },
}
DP = {
    "description": "centralized (pooled data), DP-SGD (example-level DP)",
    "utility": {"test_accuracy": 0.4},
    "epsilon": 0.99601,
    "delta": 1e-5,
    "privacy_level": "example",
    "membership": _membership(0.48, lira=(0.47, 0.02)),
    "inversion": {
        **FEDAVG["inversion"],
        "server_sees": "one DP-SGD step's noisy clipped gradient of the victim's batch",
        "psnr": 9.1234,
        "label_recovered": False,
    },
    "audit": _audit("dp", 0.0712, 2.26489, 5.0),
    "claim": {
        "guarantee": "(0.996, 1e-05)-DP with respect to adding or removing one example",
        "mechanism": "dp_sgd",
        "unit": "example",
        "released_outside_guarantee": ["the split's size", "validation metrics"],
    },
}


@pytest.fixture(scope="module")
def report():
    return {
        "settings": {"central": CENTRAL, "fedavg": FEDAVG, "secagg": SECAGG, "dp": DP},
        "audits": [
            DP["audit"],
            _audit("dp [no_noise]", math.inf, 2.26489, 5.0, consistent=False),
            _audit("dp (whole run)", 0.1, 0.99601, 4.9123),
            _audit("weak", 0.0, 3.0, 1.5),
        ],
        "majority_class_accuracy": 0.35,
        "plots": {"mia_roc": "mia_roc.png", "custom_plot": "custom.png"},
        "seconds": 12.6,
    }


@pytest.fixture(scope="module")
def text(report):
    return markdown.render(report)


def table_rows(text: str, section: str) -> dict[str, list[str]]:
    """Rows of the first table after ``## section``, keyed by their first cell."""
    lines = text.splitlines()
    start = lines.index(f"## {section}")
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_sections_in_order(text):
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Settings",
        "## Privacy claims",
        "## What the server sees",
        "## Audits",
        "## Plots",
        "## Reproduce",
    ]
    assert text.startswith("# Privacy report\n")


def test_every_setting_has_one_row_with_formatted_numbers(text):
    rows = table_rows(text, "Settings")
    assert list(rows) == ["setting", "central", "fedavg", "secagg", "dp"]
    assert all(len(cells) == 8 for cells in rows.values())
    central = rows["central"]
    assert central[:3] == [
        "centralized (pooled data), no defence",
        "0.877",  # three significant digits
        "none (not private)",  # a None epsilon
    ]
    assert central[3:] == ["0.612", "n/a", "n/a", "n/a", "n/a"]  # no LiRA, no inversion/audit
    fedavg = rows["fedavg"]
    assert fedavg[1:6] == ["0.5", "none (not private)", "0.5", "0.533", "0.0125"]
    assert fedavg[6] == "27.1 dB (random 9.5, mean image 20)"
    dp = rows["dp"]
    assert dp[2] == "0.996 (example, delta 1e-05)"
    assert dp[7] == "0.0712 <= 2.26"


def test_majority_line_only_when_given(report, text):
    assert "Always predicting the most common class scores 0.35 test accuracy." in text
    without = markdown.render({**report, "majority_class_accuracy": None})
    assert "Always predicting" not in without


def bullets(text: str, section: str) -> dict[str, str]:
    """The ``- **name**: ...`` lines of ``## section``, keyed by name."""
    lines = text.splitlines()
    out = {}
    for line in lines[lines.index(f"## {section}") + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("- **"):
            out[line.split("**")[1]] = line
    return out


def test_privacy_claims(text):
    by_name = bullets(text, "Privacy claims")
    assert list(by_name) == ["central", "fedavg", "secagg", "dp"]
    for name in ("central", "fedavg", "secagg"):
        assert by_name[name] == f"- **{name}**: no privacy claim."
    assert by_name["dp"] == (
        f"- **dp**: {DP['claim']['guarantee']}. Released outside it: the split's size; "
        "validation metrics."
    )


def test_a_claim_that_releases_nothing_says_so(report):
    claim = {**DP["claim"], "released_outside_guarantee": []}
    settings = {"dp": {**DP, "claim": claim}}
    text = markdown.render({**report, "settings": settings})
    assert bullets(text, "Privacy claims")["dp"].endswith(". Released outside it: nothing.")


def test_what_the_server_sees(text):
    by_name = bullets(text, "What the server sees")
    assert list(by_name) == ["central", "fedavg", "secagg", "dp"]
    assert by_name["central"] == (
        "- **central**: the training images themselves (data are pooled)."
    )
    assert by_name["fedavg"] == (
        "- **fedavg**: the victim client's model update: 1 image(s) behind the update, PSNR "
        "27.1 dB and SSIM 0.86 on the victim's 1 (random images: 9.5 dB, the mean training "
        "image: 20 dB); label read off the update: yes."
    )
    assert by_name["secagg"].endswith("; labels given to the attacker.")
    assert "3 image(s) behind the update" in by_name["secagg"]
    assert by_name["dp"].endswith("label read off the update: no.")


def test_audit_rows_and_weak_audits(report, text):
    rows = table_rows(text, "Audits")
    assert list(rows) == ["audited", "dp", "dp [no_noise]", "dp (whole run)", "weak"]
    assert rows["dp"] == ["correct", "1.23", "1", "64", "0.95", "2.26", "0.0712", "yes"]
    assert rows["dp [no_noise]"][-2:] == ["inf", "no"]
    assert rows["dp (whole run)"][5:] == ["0.996", "0.1", "yes"]
    # Only the audit whose trials cannot certify its claim is called out.
    assert "Too few trials to test the claim of: weak (even" in text
    strong = [a for a in report["audits"] if a["name"] != "weak"]
    assert "Too few trials" not in markdown.render({**report, "audits": strong})


def test_no_audits_has_a_placeholder_row(report):
    text = markdown.render({**report, "audits": []})
    assert "| (no DP setting) | | | | | | | | |" in text
    assert "Too few trials" not in text


def test_plots_and_reproduce(text):
    assert "### Membership inference ROC curves\n\n![mia_roc](mia_roc.png)\n" in text
    assert "### custom_plot\n\n![custom_plot](custom.png)\n" in text  # unknown key: its name
    assert "The report took 13 s." in text
    assert text.endswith("\n")


def test_write_is_render_on_disk(tmp_path, report, text):
    path = tmp_path / "report.md"
    path.write_text("stale")
    markdown.write(path, report)  # a PathLike is accepted
    assert path.read_text() == text
    assert os.listdir(tmp_path) == ["report.md"]
