"""EAGLE3 training: the draft model and TTT loss (pure torch), the loop, checkpoints and export.

The loop (``trainer`` and what it imports) knows nothing of Kafka: it reads an item source and
reports through small sinks. ``runner`` is the one module that wires it to the live stream,
ledger, feature store and transport.
"""
