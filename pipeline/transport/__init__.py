"""Brokers behind the core contract: Kafka (the only kafka-python importer), in-process, and the local broker."""
