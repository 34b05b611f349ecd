"""The entry points: the ``weightcache`` command line, its commands, the composition root
(``wiring``) and the two agents (``node_agent``, ``controller_agent``), above the CSI plugin and
the node agent's core, which never import them."""
