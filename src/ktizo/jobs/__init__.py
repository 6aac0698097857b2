"""Background work of a running server: periodic jobs such as expiring discovered devices nobody approved."""
