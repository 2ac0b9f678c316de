"""The SageMaker side: the gateway that owns the container's port (``http``: routes and
the process; ``ws``: WebSocket streams; ``audio``: decoding what clients send;
``health``: the view of Triton ``/ping`` answers from; ``config``: settings),
``platform`` (SageMaker's limits and shutdown budget), ``serve`` (``docker/serve``:
tritonserver + gateway), ``deploy`` and ``images`` (the endpoint and its base image)."""
