"""The built-in methods, one module each. Every module here is imported by the registry's discovery, and the
classes it decorates with :func:`~brushnet.methods.register_method` become available by name: adding a method
is adding a module here (see docs/methods.md, "Adding a method")."""
