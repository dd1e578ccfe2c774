"""Generator side: target backends that capture EAGLE3 features, and the worker that publishes them."""
