"""The XAPI client: sessions over the official SDK, TLS pinning, tasks, and disk transfers."""
