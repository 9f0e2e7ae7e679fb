"""The control plane's settings, read from `LBGAT_*` environment variables (or `.env`).

The artifact store's settings (LBGAT_ARTIFACT_STORE, LBGAT_S3_*) are `workers.settings.StoreSettings`,
shared with the Ray workers; this class holds what only the service uses.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.settings import ENV_PREFIX


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # -- storage of the queue ------------------------------------------------------------------------
    database_url: str = Field(
        "sqlite:///.lbgat/lbgat.db",
        description="SQLAlchemy URL: sqlite:///path (WAL mode) or postgresql+psycopg://user@host/db",
    )
    database_pool_size: int = Field(10, ge=1, description="connections per service replica (PostgreSQL)")

    # -- Ray -----------------------------------------------------------------------------------------
    ray_address: str | None = Field(
        None,
        description="Ray dashboard/Job API address, e.g. http://ray-head:8265. "
        "Unset: `lbgat serve` starts a local Ray and uses its dashboard.",
    )
    ray_auth_token: SecretStr | None = Field(
        None,
        description="token of a Ray cluster with token auth (Ray >= 2.52 turns it on by default); "
        "unset: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH (never ~/.ray/auth_token unless "
        "RAY_AUTH_TOKEN_PATH names it). A local Ray started by `lbgat serve` uses its own token.",
    )
    state_dir: Path = Field(
        Path(".lbgat"),
        description="this installation's local state: the local Ray's token (ray_auth_token), the "
        "bootstrap admin's credentials; the default database and artifact store live here too",
    )
    ray_dashboard_url: str | None = Field(
        None, description="dashboard address users' browsers reach (default: ray_address)"
    )
    worker_python: str = Field(
        "python", description="the Python the Ray job entrypoint runs (`<worker_python> -m workers.run`)"
    )
    worker_entrypoint: str = Field(
        "{python} -m workers.run --job-id {job_id}",
        description="the Ray job's command; {python} is worker_python, {job_id} the experiment id",
    )
    gpu_resource: str = Field(
        "GPU",
        min_length=1,
        description="the Ray resource that counts as a GPU: jobs are admitted by how much of it the live "
        "nodes report, and their workers ask for it (passed to Ray jobs as LBGAT_GPU_RESOURCE). A custom "
        "resource (e.g. fake_gpu) stands for a GPU on CPU-only clusters; the workers then run on CPUs.",
    )
    pass_store_credentials: bool = Field(
        True,
        description="hand the store's keys to Ray jobs in their runtime env. Turn off when the Ray nodes "
        "have LBGAT_S3_* in their own environment (compose / Kubernetes secrets): the Ray dashboard "
        "shows a job's runtime env to everyone who can open it.",
    )

    # -- scheduler -----------------------------------------------------------------------------------
    scheduler_enabled: bool = Field(True, description="run the dispatcher in this process")
    max_running_jobs: int = Field(4, ge=0, description="Ray jobs running at once, all users together")
    user_max_running_jobs: int = Field(2, ge=0, description="default per-user limit on running jobs")
    user_max_gpus: float = Field(8, ge=0, description="default per-user limit on GPUs held at once")
    default_max_attempts: int = Field(2, ge=1, le=20, description="Ray job attempts before `failed`")
    poll_interval_s: float = Field(1.0, gt=0, description="pause between scheduler rounds")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often running jobs' metrics are read")
    lost_job_grace_s: float = Field(
        30.0, gt=0, description="a dispatched job Ray does not know after this long is submitted again"
    )
    fair_share_window_h: float = Field(
        168.0, gt=0, description="GPU-hours older than this no longer count against a user (hours)"
    )
    fair_share_quantum_h: float = Field(
        1.0,
        ge=0,
        description="GPU-hours charged in advance for each job a user has running, so that free slots "
        "alternate between users whose finished usage is equal",
    )
    cpu_gpu_equivalent: float = Field(
        0.125, ge=0, description="GPU-hours charged per CPU-hour for jobs that use no GPU"
    )
    store_probe_interval_s: float = Field(
        2.0,
        gt=0,
        description="how often the scheduler checks, in a thread of its own, that the artifact store answers",
    )
    store_probe_timeout_s: float = Field(
        2.0,
        gt=0,
        description="connect/read timeout of that check and of the scheduler's own store requests (one "
        "attempt each): the longest an outage can hold up a scheduling round",
    )
    store_outage_fail_s: float = Field(
        1800.0,
        gt=0,
        description="a store unreachable for longer than this fails the running jobs (their Ray jobs are "
        "stopped: they could not save checkpoints or results); waiting jobs stay queued",
    )

    # -- preemption and start-time estimates (service.scheduler) --------------------------------------
    preemption_enabled: bool = Field(
        False,
        description="let a waiting job that cannot be admitted for capacity stop lower-priority running "
        "jobs: they save a just-in-time checkpoint, go back to the queue and resume from it",
    )
    preempt_min_priority: int = Field(
        1,
        description="the lowest priority a job must have to preempt others; a victim's priority is always "
        "strictly lower than the preempting job's",
    )
    preempt_min_run_s: float = Field(
        600.0, ge=0, description="a job runs at least this long (seconds) before it can be preempted"
    )
    preemption_grace_s: float = Field(
        60.0,
        gt=0,
        description="how long a preempted job has to save its checkpoint and exit before Ray kills it "
        "(RAY_JOB_STOP_WAIT_TIME_S of its Ray job)",
    )
    preemption_stop_margin_s: float = Field(
        30.0,
        ge=0,
        description="past grace + this margin, a victim Ray still reports running is stopped again",
    )
    estimate_default_duration_s: float = Field(
        3600.0, gt=0, description="expected run time of a job whose epoch (or shard) duration is unknown yet"
    )
    estimate_record_threshold_s: float = Field(
        60.0,
        ge=0,
        description="an estimated start is recorded (start_estimates) when first made and whenever it "
        "moves by more than this (seconds), so that its error can be measured",
    )
    estimate_max_jobs: int = Field(
        1000, ge=0, description="estimate the start of the first this many waiting jobs (queue order)"
    )

    # -- API -----------------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="if set, an admin user `admin` with this token exists at start (bootstrap)"
    )
    max_spec_bytes: int = Field(256 * 1024, ge=1024, description="largest accepted request body")
    max_stored_spec_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="largest spec stored for a job, as the JSON of the resolved spec: defaults are "
        "filled in and YAML aliases multiply what they point to, so it can exceed the body it came in",
    )
    max_upload_bytes: int = Field(
        2 * 1024**3,
        ge=1024,
        description="largest checkpoint upload (POST /v1/checkpoints), in bytes: a larger body is refused "
        "with 413 as it arrives, and an archive that declares more unpacked bytes is refused with 422",
    )
    max_page_size: int = Field(200, ge=1, description="largest `limit` of a list request")
    presign_expiry_s: int = Field(900, ge=60, le=7 * 24 * 3600)
    cors_origins: list[str] = Field(default_factory=list)
    metrics_token: SecretStr | None = Field(
        None,
        description="a bearer token that may read GET /metrics and nothing else (Prometheus's "
        "credentials file); any user's API token reads it too",
    )

    # -- web pages (service/web) ---------------------------------------------------------------------
    web_enabled: bool = Field(
        True, description="serve the team's pages (/, /queue, /experiments, /leaderboard)"
    )
    web_session_hours: float = Field(
        168.0, gt=0, description="a page session (sign-in with an API token) lasts this long (hours)"
    )
    web_cookie_secure: bool | None = Field(
        None,
        description="mark the session cookie Secure: true, false, or unset to mark it when the page is "
        "served over https (behind a proxy: run uvicorn with --proxy-headers)",
    )
    web_secret: SecretStr | None = Field(
        None,
        description="key of the pages' CSRF tokens (HMAC of the session); unset: the tokens are keyed "
        "with the session alone. Give every replica the same value.",
    )

    # -- accounting: usage, team budgets (service.accounting) ----------------------------------------
    budget_warning_fraction: float = Field(
        0.8, gt=0, le=1, description="a team is warned when it has used this fraction of its budget"
    )
    budget_default_action: Literal["lower_priority", "hold"] = Field(
        "lower_priority",
        description="what a spent budget does to the team's waiting jobs when the budget names no action",
    )
    budget_priority_penalty: int = Field(
        100,
        ge=0,
        le=1000,
        description="lower_priority: subtracted from the priority of a team's waiting jobs once its budget "
        "is spent",
    )
    usage_default_days: float = Field(
        30.0, gt=0, le=3660, description="GET /v1/usage without `since`: this many days back"
    )

    # -- webhooks (service.webhooks) -----------------------------------------------------------------
    webhooks_enabled: bool = Field(True, description="run the webhook sender thread in this process")
    webhook_max_attempts: int = Field(6, ge=1, le=50, description="tries per event before giving up")
    webhook_backoff_s: float = Field(
        10.0, gt=0, description="pause before the first retry (seconds); doubles with each retry"
    )
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="longest pause between retries")
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, description="connect/read timeout of one request to a receiver"
    )
    webhook_poll_interval_s: float = Field(1.0, gt=0, description="how often the sender looks for due events")
    webhook_concurrency: int = Field(
        8, ge=1, le=64, description="requests in flight at once (a dead receiver holds only one)"
    )
    webhook_retention_days: float = Field(
        30.0, gt=0, description="delivered and given-up events older than this are deleted"
    )
    webhook_allow_private: bool = Field(
        True,
        description="allow receivers on loopback, private and link-local addresses (a lab cluster's own "
        "network); false refuses them at creation and before every request (SSRF)",
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="if set, the only receiver hosts allowed (a name also allows its subdomains)",
    )

    @field_validator("worker_entrypoint")
    @classmethod
    def _entrypoint_placeholders(cls, value: str) -> str:
        """Refused at start, not when the first job is claimed (the job would stay `dispatching`)."""
        try:
            value.format(python="python", job_id="job")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"the command may use only the placeholders {{python}} and {{job_id}} "
                f"(double a literal brace: {{{{ }}}}); {type(exc).__name__}: {exc}"
            ) from None
        return value

    @field_validator("ray_address", "ray_dashboard_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def dashboard_base(self) -> str | None:
        base = self.ray_dashboard_url or self.ray_address
        if base and "://" not in base:
            base = "http://" + base
        return base.rstrip("/") if base else None


@lru_cache(maxsize=1)
def get_settings() -> ServiceSettings:
    return ServiceSettings()
