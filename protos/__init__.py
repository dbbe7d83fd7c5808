"""The gRPC service definition and its generated stubs (the front issue)."""
