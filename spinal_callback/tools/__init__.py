"""The ``spinal`` command line (``demo``, ``audit``, ``localize``) and its reports."""
