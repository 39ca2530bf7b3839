"""Kubernetes operator for ZeroCopyModel resources (lands with the operator issue)."""
