"""The `lbgat` command: presets, spec resolution and its errors in-process; one real run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api_schemas.presets import PRESETS
from service.client.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- presets


def test_presets_json_lists_every_preset_with_its_source(capsys):
    code, out, _ = _run(["presets", "--json"], capsys)
    assert code == 0
    listed = json.loads(out)
    assert [p["name"] for p in listed] == sorted(PRESETS)
    by_name = {p["name"]: p for p in listed}
    for name, preset in PRESETS.items():
        assert by_name[name] == {
            "name": name,
            "description": preset.description,
            "source": preset.source,
            "code": preset.code,
            "deviations": list(preset.deviations),
        }
    assert by_name["lbgat-trades-a0-cifar10"]["source"] == "LBGAT (ICCV 2021) Tables 2-3, 6"
    assert by_name["lbgat-tiny-imagenet"]["source"] == "LBGAT (ICCV 2021) Table 5"
    assert by_name["natural-tiny-imagenet"]["source"] == "LBGAT (ICCV 2021) Sec. 4 setting (no table row)"
    assert by_name["digits"]["source"] == "CPU demo (not a paper setting)"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_show_prints_spec_source_code_and_deviations(capsys, name):
    preset = PRESETS[name]
    code, out, _ = _run(["presets", "--show", name], capsys)
    assert code == 0
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert f"# source: {preset.source}" in comments
    assert f"# code: {preset.code or '(none: follows the paper)'}" in comments
    assert "# deviations:" + ("" if preset.deviations else " none known") in comments
    for note in preset.deviations:
        assert f"#   - {note}" in comments
    assert yaml.safe_load(out) == preset.data  # the rest is the spec, as YAML


def test_presets_show_json_and_unknown_name(capsys):
    code, out, _ = _run(["presets", "--show", "cat-cent-b0.05-cifar10-wrn34", "--json"], capsys)
    shown = json.loads(out)
    assert code == 0 and shown["spec"] == PRESETS["cat-cent-b0.05-cifar10-wrn34"].data
    assert shown["code"].startswith("TienjinHuang/Calibrated-adversarial-training")
    assert any("110" in note for note in shown["deviations"])
    code, _, err = _run(["presets", "--show", "no-such-preset"], capsys)
    assert code == 2 and "unknown preset" in err


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 4 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_presets_table_on_a_wide_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _run(["presets"], capsys)
    assert code == 0
    assert "lbgat presets" in out
    rows = _table_rows(out)
    assert set(PRESETS) <= set(rows)
    assert rows["lbgat-trades-a0-cifar10"] == [
        "lbgat (trades, alpha=0.0)",
        "cifar10",
        "LBGAT (ICCV 2021) Tables 2-3, 6",
    ]
    assert rows["trades-a6-tiny-imagenet"] == ["trades", "tiny_imagenet", "LBGAT (ICCV 2021) Table 5"]
    assert rows["digits"][:2] == ["lbgat (trades, alpha=0.0)", "digits"]


def test_presets_table_shows_full_names_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _run(["presets"], capsys)
    assert code == 0
    assert "lbgat-trades-a0-cifar10" in out
    assert set(PRESETS) <= set(_table_rows(out))


# ----------------------------------------------------------------------------- train: spec resolution


def test_train_dry_run_prints_the_resolved_spec(capsys):
    code, out, _ = _run(
        [
            "train",
            "--preset",
            "digits",
            "--dry-run",
            "--set",
            "optimization.epochs=5",
            "--set",
            "optimization.schedule.milestones=[3]",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0
    spec = json.loads(out)
    assert spec["name"] == "digits"
    assert spec["optimization"]["epochs"] == 5
    assert spec["optimization"]["schedule"]["milestones"] == [3]
    assert spec["optimization"]["lr"] == 0.1  # untouched fields keep the preset's value
    assert spec["runtime"]["device"] == "cpu"
    assert spec["method"] == {
        "name": "lbgat",
        "alpha": 0.0,
        "regularizer": "trades",
        "robust_ce": False,
        "beta": 1.0,
    }
    assert PRESETS["digits"].data["optimization"]["epochs"] == 30


def test_train_dry_run_from_a_spec_file(tmp_path: Path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(PRESETS["lbgat-trades-a6-cifar100"].data))
    code, out, _ = _run(["train", str(path), "--dry-run", "--set", "method.alpha=3"], capsys)
    assert code == 0
    spec = json.loads(out)
    assert spec["method"]["alpha"] == 3.0
    assert spec["dataset"]["name"] == "cifar100"


def test_train_bad_spec_file_exits_2_naming_the_field(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"
        "method: {name: lbgat, alpha: -1}\n"
        "model: {robust: {name: tiny_cnn}, teacher: {name: tiny_cnn}}\n"
        "dataset: {name: digits, colour: true}\n"
    )
    code, out, err = _run(["train", str(path), "--dry-run"], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: invalid {path}:")
    assert "  method.alpha: Input should be greater than or equal to 0" in err
    assert "  dataset.colour: Extra inputs are not permitted" in err


def test_train_missing_spec_file_exits_2(tmp_path: Path, capsys):
    path = tmp_path / "nope.yaml"
    code, _, err = _run(["train", str(path), "--dry-run"], capsys)
    assert code == 2
    assert f"no such spec file: {path}" in err


def test_train_unknown_preset_exits_2_naming_available(capsys):
    code, out, err = _run(["train", "--preset", "lbgat-imagenet", "--dry-run"], capsys)
    assert code == 2
    assert out == ""
    assert "preset: unknown preset 'lbgat-imagenet'" in err
    assert "available:" in err
    assert "lbgat-trades-a0-cifar10" in err
    assert "digits" in err


def test_train_spec_and_preset_together_exit_2(tmp_path: Path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(PRESETS["digits"].data))
    code, out, err = _run(["train", str(path), "--preset", "digits", "--dry-run"], capsys)
    assert code == 2
    assert out == ""
    assert "either a spec file or --preset" in err
    # and neither
    code, _, err = _run(["train", "--dry-run"], capsys)
    assert code == 2
    assert "either a spec file or --preset" in err


def test_train_bad_override_exits_2(capsys):
    code, _, err = _run(["train", "--preset", "digits", "--dry-run", "--set", "noequals"], capsys)
    assert code == 2
    assert "invalid --set" in err
    assert "'noequals' must look like key.path=value" in err

    code, _, err = _run(
        ["train", "--preset", "digits", "--dry-run", "--set", "optimization.epochs=5"], capsys
    )
    assert code == 2  # milestones [22, 27] no longer fit
    assert "optimization.schedule.milestones: every milestone must be below epochs=5" in err


# ----------------------------------------------------------------------------- end to end


def _lbgat(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "service.client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_train_resume_and_eval_end_to_end(tmp_path: Path):
    out_dir = tmp_path / "run"
    # Note: 2 epochs on the full digits training split (~1200 images). With dataset.train_limit=400
    # the 14 SGD steps (lr dropping to 0.01 after the first epoch) leave the model near chance.
    train_args = [
        "train",
        "--preset",
        "digits",
        "--out",
        str(out_dir),
        "--device",
        "cpu",
        "--set",
        "optimization.epochs=2",
        "--set",
        "optimization.schedule.milestones=[1]",
        "--set",
        "runtime.progress=false",
        "--set",
        "evaluation.attacks=[{kind: pgd, steps: 5, step_size: 0.02}]",
        "--json",
    ]
    proc = _lbgat(*train_args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary == printed
    assert summary["name"] == "digits"
    assert summary["method"] == "lbgat"
    assert summary["dataset"] == "digits"
    assert summary["epochs"] == 2
    assert summary["spec"]["optimization"]["epochs"] == 2
    final = summary["final"]
    assert final["clean_accuracy"] > 0.3
    assert final["n_examples"] == 450  # sklearn digits: 1797 images, 25% test split
    assert final["epoch"] == 2
    assert final["checkpoint"] == str(out_dir / "checkpoints" / "last.pt")
    (pgd5,) = final["attacks"]
    assert pgd5["name"] == "pgd5"
    assert pgd5["kind"] == "pgd"
    assert pgd5["params"]["steps"] == 5
    assert pgd5["params"]["step_size"] == 0.02
    assert pgd5["params"]["eps"] == 0.1  # the digits threat model
    assert 0 <= pgd5["accuracy"] <= final["clean_accuracy"]
    assert final["robust_accuracy"] == pgd5["accuracy"]
    assert final["worst_attack"] == "pgd5"
    # best-checkpoint selection on the 150 held-out images (selection.metric pgd_acc)
    assert summary["best_epoch"] in (1, 2)
    assert summary["best_checkpoint"] == str(out_dir / "checkpoints" / "best.pt")
    assert summary["best"]["epoch"] == summary["best_epoch"]

    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0]["lr"] == pytest.approx(0.1)
    assert metrics[1]["lr"] == pytest.approx(0.01)
    assert all(set(m["val"]) == {"clean_acc", "pgd_acc", "nrr"} for m in metrics)
    assert (out_dir / "checkpoints" / "last.pt").is_file()
    assert (out_dir / "checkpoints" / "best.pt").is_file()
    assert json.loads((out_dir / "spec.json").read_text())["optimization"]["epochs"] == 2

    # --resume on a finished run: nothing more to train
    proc = _lbgat(*train_args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr
    assert "epoch 1:" not in proc.stderr
    assert "epoch 3:" not in proc.stderr
    resumed = json.loads((out_dir / "summary.json").read_text())
    assert resumed["epochs"] == 2
    assert resumed["final"]["epoch"] == 2
    assert resumed["best_epoch"] == summary["best_epoch"]
    assert [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] == metrics

    # lbgat eval with a suite file
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "evaluation": {
                    "attacks": [
                        {"kind": "fgsm", "name": "fgsm"},
                        {"kind": "pgd", "loss": "cw", "steps": 20, "step_size": 0.01},
                    ]
                }
            }
        )
    )
    report_path = tmp_path / "reports" / "eval.json"
    proc = _lbgat(
        "eval",
        str(out_dir / "checkpoints" / "last.pt"),
        "--json",
        "--n-examples",
        "100",
        "--suite",
        str(suite),
        "--device",
        "cpu",
        "--out",
        str(report_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert json.loads(report_path.read_text()) == report
    assert report["n_examples"] == 100
    assert report["epoch"] == 2  # last.pt was not rewritten by the resumed run
    assert report["checkpoint"] == str(out_dir / "checkpoints" / "last.pt")
    assert [a["name"] for a in report["attacks"]] == ["fgsm", "cw20"]
    assert [a["kind"] for a in report["attacks"]] == ["fgsm", "pgd"]
    assert report["attacks"][1]["params"]["loss"] == "cw"
    assert report["attacks"][1]["params"]["steps"] == 20
    assert 0.0 <= report["clean_accuracy"] <= 1.0
    for attack in report["attacks"]:
        assert attack["n_examples"] == 100
        assert 0.0 <= attack["accuracy"] <= 1.0
    accuracies = {a["name"]: a["accuracy"] for a in report["attacks"]}
    assert report["robust_accuracy"] == min(accuracies.values())
    assert report["worst_attack"] == min(accuracies, key=accuracies.get)
