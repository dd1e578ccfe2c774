"""The application: one config, one composition root, and the `specstream` command line."""
