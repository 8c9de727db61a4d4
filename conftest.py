"""Root conftest: loads the kit's pytest plugin, nothing else.

When the kit is pip-installed, its ``pytest11`` entry point (named ``conformance.plugin``) has already
registered the plugin and pytest skips this second registration.
"""

pytest_plugins = ["conformance.plugin"]
