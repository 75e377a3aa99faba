"""Inter-process messaging: frame codec, broker (ROUTER), worker and client sockets (DEALER)."""
