"""Reading a finished output back: ``inspect`` computes its numbers with DuckDB, ``html`` plots them.
Neither imports Ray or torch, so ``bertpipe inspect`` and ``bertpipe report`` start fast."""
