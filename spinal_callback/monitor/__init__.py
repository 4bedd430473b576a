"""Deciding: the alerts, ``RampMonitor`` and its rules, each scoring a run against its own
reference."""
