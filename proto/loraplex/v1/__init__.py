"""Generated Python modules of the loraplex.v1 gRPC API (see loraplex.proto; regenerate with
scripts/gen_proto.sh): `loraplex_pb2` (messages) and `loraplex_pb2_grpc` (stubs and servicers)."""
