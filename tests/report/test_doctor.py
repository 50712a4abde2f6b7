"""``python -m stable_dfl doctor``: JSON fields and exit codes."""

from __future__ import annotations

import json

import pytest

from stable_dfl import doctor
from stable_dfl.__main__ import main
from stable_dfl.train import default_cpu_precision


@pytest.fixture(scope="module")
def doctor_json():
    from contextlib import redirect_stdout
    from io import StringIO

    output = StringIO()
    with redirect_stdout(output):
        code = main(["doctor", "--json"])
    return code, json.loads(output.getvalue())


def test_doctor_json_fields_and_success(doctor_json):
    code, document = doctor_json
    assert code == 0 and document["ok"] is True
    assert set(document["versions"]) == {"stable_dfl", "torch", "python"}
    names = [check["name"] for check in document["checks"]]
    assert {"extension_loaded", "dfl_clamps", "head_init", "smoke_training"} <= set(names)
    assert "agreement:cpu@cpu:random" in names and "agreement:cpu@cpu:extreme" in names
    for check in document["checks"]:
        assert set(check) == {"name", "ok", "detail", "values"}
    cpu = next(b for b in document["backends"] if b["backend"] == "cpu" and b["device"] == "cpu")
    assert cpu == {"backend": "cpu", "device": "cpu", "reason": None, "usable": True}
    smoke = next(c for c in document["checks"] if c["name"] == "smoke_training")
    assert smoke["values"]["steps"] == doctor.SMOKE_STEPS
    # The smoke run trains in the precision a run with --amp auto gets on this CPU.
    assert smoke["values"]["precision"] == default_cpu_precision().name
    assert smoke["detail"].endswith(default_cpu_precision().reason)


def test_doctor_fails_when_a_check_fails(monkeypatch, capsys):
    failing = doctor.DoctorCheck("head_init", False, "initial DFL 9.0")
    monkeypatch.setattr(doctor, "run_checks", lambda: [failing])
    assert main(["doctor"]) == 1
    assert "FAIL  head_init" in capsys.readouterr().out


def test_clamp_check_detects_an_unclamped_loss(monkeypatch):
    from stable_dfl import stable_dfl_loss

    def unclamped(*args, **kwargs):
        return stable_dfl_loss(*args, **{**kwargs, "eps": 0.0, "max_loss": None})

    monkeypatch.setattr(doctor, "stable_dfl_loss", unclamped)
    assert doctor.check_dfl_clamps().ok is False


def test_clamp_check_runs_the_loss_with_the_clamps_it_is_given():
    assert doctor.check_dfl_clamps(max_loss=10.0, eps=1e-4).ok
