"""Tests against a real tritonserver over gRPC (the streaming and two-pass models, faults, admission)."""
