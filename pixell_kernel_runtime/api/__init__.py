"""HTTP only: parse, validate, call a manager, shape the answer."""
