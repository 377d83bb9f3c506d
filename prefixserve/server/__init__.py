"""The HTTP server: FastAPI app, OpenAI-compatible and tasks routes, tenancy, metrics."""
