"""The loss registry (objectives/registry.py, catalog.py): one entry per loss carries its settings,
bounds, metrics and docs rows; a setting shared by several losses is one option they agree on."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest

from drpo_cli.config import TrainConfig
from drpo_cli.objectives import catalog
from drpo_cli.objectives.metrics import INSPECT_MODEL_METRICS
from drpo_cli.objectives.registry import POSITIVE, REGISTRY, Setting, register_loss


def test_every_entry_is_complete():
    assert list(catalog.LOSSES) == sorted(REGISTRY, key=lambda name: REGISTRY[name].rank)
    for name, spec in catalog.LOSSES.items():
        assert spec.name == name and spec.level in ("token", "sequence", "batch"), name
        assert spec.contract in ("token", "sequence", "geometric"), name
        assert (spec.seq_ratio is not None) == (spec.contract != "token"), name
        assert all(isinstance(s, Setting) for s in spec.settings.values()), name
        assert spec.doc.paper and spec.doc.source, name


def test_every_metric_a_loss_reports_is_a_stable_inspect_metric():
    for name, spec in catalog.LOSSES.items():
        named = set(spec.metrics.values()) | set(spec.effect_metrics) | ({spec.zeroing} - {None})
        assert named <= set(INSPECT_MODEL_METRICS), (name, named - set(INSPECT_MODEL_METRICS))
        assert set(spec.effect_metrics) <= set(spec.metrics.values()), name
        assert (spec.effects is None) == (not spec.effect_metrics), name
        if spec.weight_stats:
            ns = name.replace("-", "_")
            assert {f"weight/{ns}_corrective_frac", f"weight/{ns}_attenuated_frac"} <= set(INSPECT_MODEL_METRICS)


def test_the_config_fields_are_the_registrys_settings():
    hparams = {f.name: f for f in fields(TrainConfig) if f.metadata.get("hparam")}
    assert tuple(hparams) == catalog.HPARAM_NAMES
    for name, setting in catalog.SETTINGS.items():
        assert hparams[name].metadata["bound"] is setting.bound and hparams[name].default is None, name
        assert hparams[name].metadata["help"] == setting.help, name


def test_shared_settings_must_agree_and_ranks_be_unique():
    spo = catalog.LOSSES["spo"]
    other = replace(spo, name="spo-2", rank=99, settings={"eps": replace(spo.settings["eps"], default=0.3)})
    assert catalog.option_settings({"spo": spo, "spo-2": other})["eps"].default == 0.2  # defaults may differ
    for change in ({"bound": None}, {"help": "another ε of {}."}, {"order": 50}, {"kind": int}):
        bad = replace(other, settings={"eps": replace(spo.settings["eps"], **change)})
        with pytest.raises(TypeError, match="setting 'eps': spo-2 and spo declare different"):
            catalog.option_settings({"spo": spo, "spo-2": bad})
    with pytest.raises(ValueError, match="both have rank 3"):
        catalog.in_rank_order({"spo": spo, "spo-2": replace(other, rank=3)})
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("spo", rank=99, weight=spo.weight, doc=spo.doc)(spo.loss)
    assert REGISTRY["spo"] is spo


def test_one_bound_checked_by_the_library_and_the_options():
    # The library's message and the option's come from the same Setting (the bound's text, or its
    # library wording where the command line's would mislead a Python caller).
    assert catalog.SETTINGS["delta"].bound is POSITIVE
    assert catalog.validate_hparams("drpo", {"delta": 0}) == ["drpo: delta must be > 0, got 0"]
    assert catalog.setting_help("delta") == "δ of dppo-tv (0.15), dppo-kl (0.05), drpo (12.5)."


def test_the_loss_modules_import_without_torch():
    code = ("import sys, drpo_cli.objectives.losses, drpo_cli.objectives.corrections, drpo_cli.reports.loss_tables; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
