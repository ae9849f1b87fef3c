"""The network front of the engine: gRPC servicer (proto <-> engine, status codes), the OpenAI-compatible
HTTP API, admission (shared by both), server (build, run, drain on signals), metrics (Prometheus), and the
`serve` subcommand. It reaches the engine only through `engine/client.py`'s `EngineClient`."""
