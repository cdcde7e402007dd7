"""Generated protobuf and gRPC modules for the har.v1 API (protos/har/v1/har.proto).

Do not edit: regenerate with `python scripts/gen_protos.py`. Importing this package pulls in only
protobuf and grpcio (never JAX), so the web UI and other clients can use it on machines without
the model:

    from har_flax.proto.har.v1 import har_pb2, har_pb2_grpc
"""
