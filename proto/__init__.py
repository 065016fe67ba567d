"""Generated gRPC/protobuf code for the fledger.v1 wire protocol; regenerate with ``python -m proto.regen``."""
