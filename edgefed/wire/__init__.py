"""The wire: protobuf messages (edgefed.v1) and the framing of states into checked, chunked streams."""
