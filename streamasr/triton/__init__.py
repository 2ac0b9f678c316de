"""The Triton edge: python-backend adapters, the server launcher, the model repository."""
