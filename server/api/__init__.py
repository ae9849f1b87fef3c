"""The network front of the engine: gRPC servicer (proto <-> engine, status codes), the OpenAI-compatible
HTTP API, server (build, run, drain on signals), metrics (Prometheus), and the `serve` subcommand."""
