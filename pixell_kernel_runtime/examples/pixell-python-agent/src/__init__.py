"""pixell-python-agent source package."""
