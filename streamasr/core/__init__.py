"""The core: features, decoding, per-stream state, admission, two-pass re-decoding -- no Triton, no I/O."""
