"""Transports: how the server's round reaches its clients (in this process, or over gRPC)."""
