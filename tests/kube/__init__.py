"""Tests against a real Kubernetes API: a control plane started from envtest's binaries (`envtest`), or the cluster
`--kubeconfig` names (`clusters`); KubeRay's CRDs are found through `kuberay`."""
