"""cops_deploy.data."""
