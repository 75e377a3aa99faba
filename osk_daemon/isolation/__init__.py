"""Isolation: what the kernel can confine, and how a plugin process is confined.

Two halves. The daemon side creates a cgroup per plugin instance with its quotas
(``cgroups``, backed by ``cgroup_v1`` on legacy/hybrid hosts and ``cgroup_v2`` on unified
ones, both over the file helpers and mount parsing in ``cgroupfs``), probes the kernel
(``probe``) and builds a ``LaunchPlan`` (``plan``). The child side applies that plan to
itself in a fixed order (``sequence``: cgroup join, namespaces, rlimits, privilege drop,
Landlock, seccomp) before any plugin code runs.

Submodules are imported explicitly by their users; this package imports nothing.
"""
