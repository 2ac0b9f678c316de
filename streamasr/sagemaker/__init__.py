"""The SageMaker side, two rooms that do not know each other: ``gateway`` (the process
that owns the container's port in front of Triton: ``http`` routes and the process,
``ws`` WebSocket streams, ``options`` what clients may set, ``audio`` decoding what they
send, ``health`` what ``/ping`` answers, ``config`` settings, ``platform`` SageMaker's
limits and shutdown budget, ``serve`` = ``docker/serve``) and ``deploy`` (the endpoint,
its base image and instance settings, through boto3)."""
