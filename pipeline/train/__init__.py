"""EAGLE3 trainer core: draft model, training-time test, vocab mapping, collation and export.

Pure torch: nothing here knows whether samples came live from Kafka, from replay or from memory.
"""
