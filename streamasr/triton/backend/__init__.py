"""The Triton python-backend models, one module per model (``streamasr/triton/python_backends/<name>/model.py``
re-exports its class as ``TritonPythonModel``), and their shared edge with Triton
(``edge``).  They only move tensors between ``pb_utils`` and the plain-Python steps in
``streamasr.pipeline``, so all behaviour is testable without a server.  Importable
only inside Triton (``triton_python_backend_utils``)."""
