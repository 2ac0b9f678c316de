"""The process on SageMaker's port: /ping, /invocations, the bidirectional-stream WebSocket."""
