"""A stateful Kubernetes API emulator for integration tests: the real kopf and kubectl talk to it over HTTP."""
