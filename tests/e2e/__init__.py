"""Tests of the container's process as SageMaker runs it: docker/serve (gateway + tritonserver), its routes, the image."""
