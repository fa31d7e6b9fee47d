"""The train job: driver, the per-worker loop, data, run state and the evaluator."""
