"""The node agent: pulls, pins and removes images through the node's container runtime."""
