"""loraplex server side: engine, scheduler, adapter store, model runner, gRPC servicer, CLI, training."""

from importlib.metadata import PackageNotFoundError, version

from loraplex.server.model import quantization  # noqa: F401  (quiets a bitsandbytes import-time warning)

try:
    __version__ = version("loraplex")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
