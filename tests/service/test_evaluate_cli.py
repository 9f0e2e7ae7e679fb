"""`lbgat evaluate`, `lbgat protocols` and the per-protocol `lbgat results` against the real API over
HTTP (uvicorn in a thread, SQLite and PostgreSQL, no Ray: finished jobs are made as in
tests/service/evaluations_helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.client.cli import main
from tests.service.conftest import Api, Person
from tests.service.evaluations_helpers import finish_evaluation, job_spec, save_digits_checkpoint, trained


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, api: Api):
    """Run `lbgat` as a person of this server: LBGAT_API_URL/LBGAT_TOKEN, an empty config folder."""
    monkeypatch.setenv("LBGAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("LBGAT_API_URL", api.url)
    monkeypatch.setenv("COLUMNS", "250")

    def use(person: Person) -> None:
        monkeypatch.setenv("LBGAT_TOKEN", person.token)

    return use


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_protocols(api: Api, as_user, capsys) -> None:
    as_user(api.person())
    code, out, err = run(capsys, "protocols")
    assert code == 0, err
    assert "robustbench-linf@1" in out and "digits@1" in out and "autoattack" in out
    code, out, _ = run(capsys, "protocols", "--show", "lbgat@1", "--json")
    assert code == 0 and json.loads(out)["suite"]["attacks"][1]["steps"] == 20
    code, out, _ = run(capsys, "protocols", "--show", "lbgat")
    assert code == 0 and "cw20" in out and "source:" in out
    code, _, err = run(capsys, "protocols", "--show", "nope")
    assert code == 2 and err.count("\n") == 1 and "unknown protocol 'nope'" in err


def test_evaluate_an_experiment_and_refusals(api: Api, as_user, capsys) -> None:
    alice = api.person()
    as_user(alice)
    exp = trained(api, alice, "cli-src")
    code, out, err = run(
        capsys,
        "evaluate",
        f"{exp}:last",
        "--protocol",
        "digits",
        "--workers",
        "2",
        "--gpus",
        "0",
        "--priority",
        "3",
        "--n-examples",
        "100",
        "--shard-size",
        "50",
    )
    assert code == 0, err
    eval_id = out.strip()
    assert f"{exp}:last under digits@1" in err
    spec = job_spec(api, eval_id)
    assert (spec.target_weights, spec.num_workers, spec.gpus_per_worker) == ("last", 2, 0.0)
    assert (spec.suite.n_examples, spec.suite.shard_size) == (100, 50)
    code, out, _ = run(capsys, "show", eval_id, "--json")
    assert code == 0 and json.loads(out)["kind"] == "evaluation" and json.loads(out)["priority"] == 3

    for argv, needle in [
        (["evaluate", exp], "give --protocol NAME"),
        (["evaluate", "--protocol", "digits"], "name what to evaluate"),
        (["evaluate", exp, "--protocol", "digits", "--all"], "--all takes no experiment arguments"),
        (["evaluate", "--extend", eval_id, "--checkpoint", "x.pt"], "exclude each other"),
        (["evaluate", "--extend", eval_id], "needs the attacks to add"),
        (
            ["evaluate", "--extend", eval_id, "--attack", "{kind: pgd, steps: [unclosed"],
            "--attack: not JSON or YAML",
        ),
        (["evaluate", "no-such-exp", "--protocol", "digits"], "body.target.experiment"),
        (["evaluate", exp, "--protocol", "robustbench-linf"], "`lbgat protocols` lists"),
        (["evaluate", f"{exp}:averaged", "--protocol", "digits"], "weight_averaging"),
        (["evaluate", exp, "--protocol", "digits", "--priority", "1000"], "body.priority"),
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
        assert needle in err, (argv, err)
        assert out == ""


def test_checkpoint_extend_transfer_bulk_and_results(api: Api, as_user, capsys, tmp_path: Path) -> None:
    bob = api.person()
    as_user(bob)
    ckpt = save_digits_checkpoint(tmp_path / "mine.pt")
    code, out, err = run(
        capsys, "evaluate", "--checkpoint", str(ckpt), "--protocol", "digits", "--name", "mine"
    )
    assert code == 0, err
    uploaded = out.strip()
    assert "stored" in err and job_spec(api, uploaded).checkpoint.key.startswith("checkpoints/")
    plain = save_digits_checkpoint(tmp_path / "plain.pt", plain=True)
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(plain), "--protocol", "digits")
    assert code == 2 and "query.model" in err and "name it with --model" in err

    a, b, c = (trained(api, bob, name) for name in ("cli-a", "cli-b", "cli-c"))
    code, out, err = run(capsys, "evaluate", a, "--protocol", "digits", "--tag", "white-box")
    white = out.strip()
    finish_evaluation(
        api, white, clean=0.9, attacks={"fgsm": 0.7, "pgd20": 0.6, "cw20": 0.6, "autoattack": 0.55}
    )
    code, out, err = run(
        capsys,
        "evaluate",
        "--extend",
        white,
        "--attack",
        "{kind: pgd, steps: 50, step_size: 0.01, name: pgd50}",
    )
    assert code == 0, err
    spec = job_spec(api, out.strip())
    assert (
        spec.base is not None
        and spec.base.evaluation_id == white
        and spec.suite.attacks[-1].label() == "pgd50"
    )

    code, out, err = run(capsys, "evaluate", "--transfer-from", a, b, c)
    assert code == 0, err
    assert "protocol: digits (the default for transfer on digits" in err
    assert [job_spec(api, i).transfer_source.key.split("/")[1] for i in out.split()] == [a, a]
    code, out, err = run(capsys, "evaluate", "--transfer-matrix", a, b, c, "--protocol", "digits")
    assert code == 0, err
    pairs = out.split()
    assert len(pairs) == 6 and f"lbgat results --transfer-matrix {a} {b} {c}" in err
    for pair in pairs:
        spec = job_spec(api, pair)
        if (spec.transfer_source.key.split("/")[1], spec.source_experiment) in {(a, b), (b, a)}:
            finish_evaluation(
                api, pair, clean=0.9, attacks={"pgd20": 0.7 if spec.source_experiment == b else 0.65}
            )
    code, out, err = run(capsys, "results", "--transfer-matrix", a, b, c)
    assert code == 0, err
    assert "70.0%" in out and "65.0%" in out and "source" in out
    code, out, _ = run(capsys, "results", "--transfer-matrix", a, b, "--json")
    assert json.loads(out)["accuracy"] == [[None, 0.7], [0.65, None]]

    code, out, err = run(capsys, "evaluate", "--all", "--protocol", "digits", "--dry-run")
    assert code == 0, err
    assert (
        set(out.split()) == {b, c} and "would queue 2" in err and f"{a}: has a result under digits@1" in err
    )

    partial = run(capsys, "evaluate", b, "--protocol", "digits", "--n-examples", "100")[1].strip()
    finish_evaluation(api, partial, clean=0.95, attacks={"pgd20": 0.9}, aa=0.9, n_total=450)
    code, out, err = run(capsys, "results", "--leaderboard", "--protocol", "digits")
    assert code == 0, err
    assert "leaderboard: digits@1" in out and white in out and partial in out
    assert "100/450 *" in out and "partial: fewer examples" in out
    assert out.index(white) < out.index(partial)  # the partial row ranks below the full one
    code, out, _ = run(capsys, "results", "--protocol", "digits", "--json")
    rows = json.loads(out)
    assert [r["evaluation_id"] for r in rows][:2] == [white, partial] and rows[1]["partial"] is True
    code, _, err = run(capsys, "results", "--protocol", "no-such")
    assert code == 2 and "query.protocol" in err and err.count("\n") == 1

    target = tmp_path / "model_info.json"
    code, out, err = run(capsys, "results", "--export", "robustbench", white, "-o", str(target))
    assert code == 0, err
    info = json.loads(target.read_text())
    assert (info["clean_acc"], info["autoattack_acc"], info["dataset"]) == ("90.00", "55.00", "digits")
    code, out, _ = run(capsys, "results", "--export", "robustbench", white)
    assert json.loads(out) == info
    code, _, err = run(capsys, "results", "--export", "csv", white)
    assert code == 2 and "robustbench" in err
