"""The training-loop layer: the framework-free ``Runner`` and the small parts it is made of."""
