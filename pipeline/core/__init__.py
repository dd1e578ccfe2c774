"""Contracts shared by every stage: no Kafka client, no torch models."""
