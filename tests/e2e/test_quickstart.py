"""The README's main job (scripts/quickstart.sh runs `python -m service.quickstart`), shortened to
two epochs: its own local Ray and service, two experiments over REST, the table and the plot."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys


def test_quickstart_runs_lbgat_and_trades_through_the_service(tmp_path):
    # the embedded defaults, as on a new machine: no LBGAT setting, no Ray token, an empty home
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LBGAT_", "RAY_", "XDG_"))}
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "service.quickstart", "--epochs", "2", "--timeout", "600"],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1", "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "runs" / "quickstart"
    comparison = json.loads((out / "comparison.json").read_text())
    rows = {row["method"]: row for row in comparison["rows"]}
    assert set(rows) == {"lbgat", "trades"}
    for row in rows.values():
        assert row["dataset"] == "digits" and row["norm"] == "linf" and row["eps"] == 0.1
        assert 0.5 < row["clean_accuracy"] <= 1.0
        assert 0.0 < row["autoattack_accuracy"] <= row["clean_accuracy"]
        assert abs(row["nrr"] - 2 * row["clean_accuracy"] * row["robust_accuracy"]
                   / (row["clean_accuracy"] + row["robust_accuracy"])) < 1e-9  # fmt: skip
    assert (out / "clean_vs_robust.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "LBGAT vs TRADES on digits" in result.stdout
        and "stopped the service and the local Ray" in result.stdout
    )
    # its Ray had token auth with the folder's own token; nothing went to the home folder
    assert stat.S_IMODE((tmp_path / ".lbgat" / "ray_auth_token").stat().st_mode) == 0o600
    assert list(home.rglob("*")) == []
    # everything landed in the embedded defaults: SQLite and the local artifact directory
    assert (tmp_path / ".lbgat" / "lbgat.db").is_file()
    assert any(
        (tmp_path / ".lbgat" / "artifacts" / "experiments").glob("quickstart-lbgat-*/main/summary.json")
    )
