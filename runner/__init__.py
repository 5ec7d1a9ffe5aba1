"""CFlow's runner: submit a task over many shards, watch it, scale the fleet, combine outputs."""
