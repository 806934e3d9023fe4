"""The coordinator: reconciles ImageCache resources into orders for the node agents."""
