"""Coppice lifecycle service: E2B's control plane over the jail layer (`coppice_jails`)."""
