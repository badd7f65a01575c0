"""cops_deploy.export."""
