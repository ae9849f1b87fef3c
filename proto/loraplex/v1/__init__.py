"""Generated Python modules of the loraplex.v1 gRPC API (see loraplex.proto; regenerate with
scripts/gen_proto.sh): `loraplex_pb2` (messages) and `loraplex_pb2_grpc` (stubs and servicers)."""

if __name__ != "loraplex.v1":  # imported by a bare name (checkout root on sys.path): refused
    raise ImportError(
        f"{__file__} is loraplex.v1, found as {__name__!r} because the checkout root is on sys.path", name=__name__
    )
