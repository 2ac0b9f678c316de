#!/bin/sh
# Stand-in for NVIDIA's entrypoint at the same path: the real one prints the banner and
# sets up CUDA forward compatibility before running its arguments; on CPU nothing to set up.
exec "$@"
