"""Sessions: (package, session_id) -> one live Jupyter kernel."""
