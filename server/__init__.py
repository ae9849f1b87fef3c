"""loraplex server side: engine, scheduler, adapter store, model runner, gRPC servicer, CLI, training."""

if __name__ != "loraplex.server":  # imported by a bare name (checkout root on sys.path): refused
    raise ImportError(
        f"{__file__} is loraplex.server, found as {__name__!r} because the checkout root is on sys.path", name=__name__
    )

from importlib.metadata import PackageNotFoundError, version

from loraplex.server.model import quantization  # noqa: F401  (quiets a bitsandbytes import-time warning)

try:
    __version__ = version("loraplex")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
