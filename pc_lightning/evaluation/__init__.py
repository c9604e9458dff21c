"""Downstream evaluation with EleutherAI's lm-evaluation-harness (``pip install -e '.[eval]'``)."""
