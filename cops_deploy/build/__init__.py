"""cops_deploy.build."""
