"""Evaluations that finish: batched, shared-prefix, resumable scoring and the lm-evaluation-harness backend (extra: [eval] for the harness)."""
