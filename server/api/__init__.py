"""The gRPC front of the engine: servicer (proto <-> engine, status codes), server (build, run, drain on
signals), metrics (Prometheus), and the `serve` and `demo` subcommands."""
