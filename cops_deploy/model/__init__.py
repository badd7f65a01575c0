"""cops_deploy.model."""
