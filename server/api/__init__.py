"""The gRPC edge: converts protos to engine commands and engine outcomes to protos."""
