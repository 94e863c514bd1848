"""`gotr1 serve`: low-latency GoT generation over HTTP, one continuously batching engine behind FastAPI."""
from gotr1.serving.app import BackgroundServer, GoTServer, ServerConfig, create_app, serve

__all__ = ["BackgroundServer", "GoTServer", "ServerConfig", "create_app", "serve"]
