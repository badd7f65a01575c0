"""cops_deploy.train."""
