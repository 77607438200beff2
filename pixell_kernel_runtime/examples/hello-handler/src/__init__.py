"""hello-handler source package."""
