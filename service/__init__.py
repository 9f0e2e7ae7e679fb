"""Control plane (FastAPI service, queue, scheduler, CLI). Never imports torch."""
