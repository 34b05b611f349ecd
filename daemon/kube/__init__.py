"""The warm controller: Kubernetes workloads that ask for models, and this node's answer."""
