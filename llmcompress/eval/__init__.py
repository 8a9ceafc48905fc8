"""`llmc evaluate`: perplexity, lm-eval tasks, speed/memory, comparison with a baseline, CI gates, reports."""
