"""osk-daemon: the ObjectStack microkernel, one OS process per plugin, supervised OTP-style."""

__version__ = "0.1.0"
