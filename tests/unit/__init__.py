"""Tests that start no server: the logic in process, the repository's files, the image recipe, the docs."""
