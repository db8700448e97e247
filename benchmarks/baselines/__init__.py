"""Baseline services measured beside stockward, behind the same gRPC contract."""
