"""The jail layer: templates, copy-on-write storage, jail runtimes and the sandbox registry.

It knows nothing of HTTP: neither the REST layer nor the gateway is imported from here.
"""
