"""Pure helpers shared by the agent and the coordinator (no I/O)."""
