"""gRPC transport between MoLink nodes: wire protocol, codec, authentication, channels."""
