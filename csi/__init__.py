"""The CSI plugin: Identity, Node and a metadata-only Controller over unix sockets."""
