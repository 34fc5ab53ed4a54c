"""Generated protobuf and gRPC modules of the edgefed.v1 wire format (do not edit; see generate.py)."""
