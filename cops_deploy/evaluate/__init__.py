"""cops_deploy.evaluate."""
