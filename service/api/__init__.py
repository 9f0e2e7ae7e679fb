"""The REST API: routes under /v1 (`api_router`) plus the unversioned health endpoints (`health_router`)."""

from fastapi import APIRouter, Depends

from service.api.openapi import reject_undeclared_query
from service.api.routes import (
    accounting,
    artifacts,
    checkpoints,
    evaluations,
    experiments,
    health,
    protocols,
    queue,
    results,
    users,
    webhooks,
)

api_router = APIRouter(prefix="/v1", dependencies=[Depends(reject_undeclared_query)])
api_router.include_router(experiments.router)
api_router.include_router(artifacts.router)
api_router.include_router(evaluations.router)
api_router.include_router(checkpoints.router)
api_router.include_router(protocols.router)
api_router.include_router(results.router)
api_router.include_router(queue.router)
api_router.include_router(users.router)
api_router.include_router(accounting.router)
api_router.include_router(webhooks.router)

# Health and metrics stay lenient: probes and scrapers may add query parameters of their own.
health_router = health.router

__all__ = ["api_router", "health_router"]
