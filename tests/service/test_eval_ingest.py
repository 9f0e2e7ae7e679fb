"""Result rows from what jobs wrote (service.ingest), and migration 0003 that holds them."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from api_schemas.protocols import EvaluationSuite, custom_protocol_version
from service.db.engine import make_engine
from service.db.migrate import current_revision, downgrade, upgrade
from service.db.models import Base, Experiment
from service.ingest import Results, eval_result, training_protocol
from tests.service.conftest import digits_spec
from tests.service.evaluations_helpers import report


def test_a_training_runs_protocol_comes_from_its_summary_else_its_spec() -> None:
    spec = digits_spec()
    assert training_protocol(spec, {"protocol_id": "lbgat", "protocol_version": 1}) == ("lbgat", "1")
    assert training_protocol({**spec, "evaluation": {"protocol": "digits@1"}}, {}) == ("digits", "1")
    assert training_protocol({**spec, "evaluation": {"protocol": "digits"}}, {}) == ("digits", "1")
    inline = {
        "attacks": [{"kind": "fgsm"}, {"kind": "pgd", "steps": 20, "step_size": 0.01}],
        "n_examples": 100,
    }
    suite = EvaluationSuite.model_validate(
        {"threat_model": spec["threat_model"], "attacks": inline["attacks"], "n_examples": 100}
    )
    assert training_protocol({**spec, "evaluation": inline}, {}) == ("custom", custom_protocol_version(suite))
    # a suite evaluation jobs would not take (AutoAttack on fewer examples): still a stable custom id
    pid, version = training_protocol(spec, {})
    assert pid == "custom" and len(version) == 12 and training_protocol(spec, {}) == (pid, version)


def _experiment(**fields: object) -> Experiment:
    values = dict(
        id="e-1",
        kind="training",
        name="e",
        team_id=1,
        owner_id=1,
        dataset="digits",
        norm="linf",
        eps=0.1,
        model="tiny_cnn",
        method="lbgat",
        spec={**digits_spec(), "evaluation": {"protocol": "digits@1"}},
    )
    return Experiment(**{**values, **fields})


def test_a_training_runs_row_is_its_selected_model() -> None:
    best = report(0.8, {"pgd20": 0.5}, aa=0.45, selection_split="test", training_precision="bf16")
    final = report(0.82, {"pgd20": 0.48}, aa=0.44)
    summary = {"final": final, "best": best, "best_checkpoint_sha256": "a" * 64, "precision": "bf16"}
    row = eval_result(_experiment(), Results(row={}, trials={}, summary=summary))
    assert (row.kind, row.weights, row.protocol_id, row.protocol_version) == (
        "training",
        "best",
        "digits",
        "1",
    )
    assert (row.clean_accuracy, row.robust_accuracy, row.autoattack_accuracy) == (0.8, 0.45, 0.45)
    assert (row.test_selected, row.precision, row.checkpoint_sha256) == (True, "bf16", "a" * 64)
    assert (row.n_examples, row.n_total, row.partial) == (450, 450, False)

    averaged = {**final, "weights": "averaged", "n_examples": 200}
    row = eval_result(_experiment(), Results(row={}, trials={}, summary={"final": averaged, "best": None}))
    assert (row.weights, row.test_selected, row.partial, row.n_total) == ("averaged", False, True, 450)
    no_attacks = {"final": {"clean_accuracy": 0.9, "n_examples": 450, "attacks": []}}
    assert eval_result(_experiment(), Results(row={}, trials={}, summary=no_attacks)) is None


def test_migration_0003_adds_kinds_checkpoints_and_results(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0002")
        with engine.begin() as conn:  # a job queued before the upgrade
            conn.execute(text("INSERT INTO teams (id, name, created_at) VALUES (1, 't', CURRENT_TIMESTAMP)"))
            conn.execute(
                text(
                    "INSERT INTO users (id, name, team_id, is_admin, created_at) "
                    "VALUES (1, 'u', 1, false, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO experiments (id, name, owner_id, team_id, state, priority, tags, method, "
                    "dataset, norm, eps, model, is_sweep, gpus, gpu_optional, cpus, charge_rate, spec, "
                    "spec_hash, attempts, max_attempts, cancel_requested, created_at, updated_at, gpu_seconds) "
                    "VALUES ('old', 'old', 1, 1, 'queued', 0, '[]', 'lbgat', 'digits', 'linf', 0.1, 'tiny_cnn', "
                    "false, 0, false, 1, 0.1, '{}', 'x', 0, 2, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0)"
                )
            )
        upgrade(engine, "0003")
        assert current_revision(engine) == "0003"
        tables = set(inspect(engine).get_table_names())
        assert {"checkpoints", "eval_results"} <= tables
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind FROM experiments WHERE id = 'old'")).scalar() == "training"
        upgrade(engine)
        with engine.connect() as conn:  # the models and the migrated schema (head) agree
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            # 0004: the queued job keeps its place; no preemption, nothing lost yet
            row = conn.execute(text("SELECT preemptions, lost_gpu_seconds FROM experiments WHERE id = 'old'"))
            assert tuple(row.one()) == (0, 0.0)
        downgrade(engine, "0003")
        assert not {"usage_records", "team_budgets", "webhooks", "start_estimates"} & set(
            inspect(engine).get_table_names()
        )
        downgrade(engine, "0002")
        assert not {"checkpoints", "eval_results"} & set(inspect(engine).get_table_names())
        assert "kind" not in {c["name"] for c in inspect(engine).get_columns("experiments")}
    finally:
        engine.dispose()
