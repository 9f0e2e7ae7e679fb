"""One module per resource; `service.api.api_router` joins them under /v1."""
