"""Everything that runs: the one round engine and what drives it, in the simulator and on the network.

Layers, each importing only those below it (tests/test_layout.py holds the rule):
- ``cli/`` and ``console/``: the operator's tools (main.py's commands, the local cluster, the console REPL).
- ``sim/``: the simulator, the network in one process (in-process peers and participants).
- ``process/``: a super node or edge node process: domain objects and servicers wired together.
- ``rpc/``: the wire layer, the only place that imports grpc or protobuf: serde, transport, clients, servicers.
- ``security/``: secure mode's identities (the network's CA, certificates, join tokens, enrollment); no grpc.
- ``engine/``: the round engine and the network's domain (membership, super node, coordinator, consensus, sync,
  jobs); no grpc, no protobuf.
- ``ledger.py`` and ``run.py``: a node's ledger, and what a run is (built from its Config); shared by all above.
Below node/: ``chain/``, ``fl/``, ``storage/``, ``config.py`` and (for rpc/ only) ``proto/``.
"""
