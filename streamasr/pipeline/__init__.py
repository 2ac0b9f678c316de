"""The pipeline steps each Triton model runs, free of Triton: testable in plain pytest."""
