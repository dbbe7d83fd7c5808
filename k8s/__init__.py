"""KubeRay manifests generated from the serving config (``python -m k8s.generate``)."""
