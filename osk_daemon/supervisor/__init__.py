"""Supervision: the OTP tree, instance lifecycle, health, backoff, spawner and their driver.

The decisions live in pure cores (``tree``, ``lifecycle``, ``health``, ``backoff``): events
in, effects out, time passed in. ``runtime`` is the one async driver that performs the
effects: it spawns processes, sends frames, signals and arms timers.
"""
