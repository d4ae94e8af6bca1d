"""xencr as a service: what lets runs overlap safely (locks, limits) and the daemon running them."""
