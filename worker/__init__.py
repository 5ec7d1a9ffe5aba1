"""CFlow's worker: the wire contract, the queue and store backends, and the agent loop."""
