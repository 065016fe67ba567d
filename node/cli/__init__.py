"""main.py's commands (simulate, node, cluster, verify) and the health probe.

May import anything in node/ and below; only main.py imports it."""
